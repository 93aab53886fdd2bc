//! Typed indices for the engine's fixed lists: a service slot (`ServiceSlot`, an entry of a
//! core's services, numbered by the control thread the same on every core and never reused)
//! a core (`CoreIndex`) and a core's listener (`ListenerIndex`). Each is its own type, and an [`IndexVec`] is indexed only by its
//! own, so a core passed where a service slot belongs, or a config's service index where a
//! slot belongs, does not compile. (Connections, workers and requests, whose entries are
//! reused, have generation-checked handles instead: `table::Handle`.)

#![forbid(unsafe_code)]

use std::fmt;
use std::marker::PhantomData;

/// An index type of an [`IndexVec`].
pub trait TypedIndex: Copy {
    fn from_usize(index: usize) -> Self;
    fn usize(self) -> usize;
}

macro_rules! typed_index {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(u32);

        impl TypedIndex for $name {
            fn from_usize(index: usize) -> $name {
                $name(u32::try_from(index).expect("an index within u32"))
            }

            fn usize(self) -> usize {
                self.0 as usize
            }
        }

        impl $name {
            pub const fn new(index: u32) -> $name {
                $name(index)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

typed_index! {
    /// A service slot: an entry of every core's services (a running service, or one a reload
    /// prepares or retires). Not a config index: `config_index` maps a slot to its service's
    /// place in the config.
    ServiceSlot
}

typed_index! {
    /// A core: its thread, ring and shard, and its entry in `Shared::cores`.
    CoreIndex
}

typed_index! {
    /// One of a core's listeners (its entry in `Core::listeners`, and the index its accept
    /// op's token carries).
    ListenerIndex
}

/// A `Vec` indexed by one index type only.
pub struct IndexVec<I, T> {
    items: Vec<T>,
    index: PhantomData<fn(I) -> I>,
}

impl<I: TypedIndex, T> IndexVec<I, T> {
    pub fn new() -> IndexVec<I, T> {
        IndexVec::from(Vec::new())
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Append `item`; its index.
    pub fn push(&mut self, item: T) -> I {
        self.items.push(item);
        I::from_usize(self.items.len() - 1)
    }

    /// Set every entry to `value`.
    pub fn fill(&mut self, value: T)
    where
        T: Clone,
    {
        self.items.fill(value);
    }

    pub fn get(&self, index: I) -> Option<&T> {
        self.items.get(index.usize())
    }

    /// Every index, in order.
    pub fn indices(&self) -> impl DoubleEndedIterator<Item = I> + ExactSizeIterator + use<I, T> {
        (0..self.items.len()).map(I::from_usize)
    }

    pub fn iter(&self) -> std::slice::Iter<'_, T> {
        self.items.iter()
    }

    pub fn iter_mut(&mut self) -> std::slice::IterMut<'_, T> {
        self.items.iter_mut()
    }

    /// Every entry with its index.
    pub fn iter_enumerated(&self) -> impl DoubleEndedIterator<Item = (I, &T)> + '_ {
        self.items
            .iter()
            .enumerate()
            .map(|(index, item)| (I::from_usize(index), item))
    }
}

impl<I: TypedIndex, T> Default for IndexVec<I, T> {
    fn default() -> Self {
        IndexVec::new()
    }
}

impl<I, T> From<Vec<T>> for IndexVec<I, T> {
    fn from(items: Vec<T>) -> Self {
        IndexVec {
            items,
            index: PhantomData,
        }
    }
}

impl<I: TypedIndex, T> FromIterator<T> for IndexVec<I, T> {
    fn from_iter<It: IntoIterator<Item = T>>(items: It) -> Self {
        IndexVec::from(items.into_iter().collect::<Vec<T>>())
    }
}

impl<I: TypedIndex, T> std::ops::Index<I> for IndexVec<I, T> {
    type Output = T;

    fn index(&self, index: I) -> &T {
        &self.items[index.usize()]
    }
}

impl<I: TypedIndex, T> std::ops::IndexMut<I> for IndexVec<I, T> {
    fn index_mut(&mut self, index: I) -> &mut T {
        &mut self.items[index.usize()]
    }
}

impl<'a, I: TypedIndex, T> IntoIterator for &'a IndexVec<I, T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.items.iter()
    }
}

impl<I, T> IntoIterator for IndexVec<I, T> {
    type Item = T;
    type IntoIter = std::vec::IntoIter<T>;

    fn into_iter(self) -> Self::IntoIter {
        self.items.into_iter()
    }
}

impl<I, T: fmt::Debug> fmt::Debug for IndexVec<I, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.items.fmt(f)
    }
}

impl<I, T: Clone> Clone for IndexVec<I, T> {
    fn clone(&self) -> Self {
        IndexVec::from(self.items.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_vec_is_indexed_by_its_own_index_type() {
        // Proves the typed access (a `CoreIndex` into services would not compile: see the
        // module doc) and that indices come back as the type pushed with.
        let mut services: IndexVec<ServiceSlot, &str> = IndexVec::new();
        let echo = services.push("echo");
        let kv = services.push("kv");
        assert_eq!((echo, kv), (ServiceSlot::new(0), ServiceSlot::new(1)));
        assert_eq!(services[kv], "kv");
        assert_eq!(services.indices().collect::<Vec<_>>(), [echo, kv]);
        assert_eq!(services.get(ServiceSlot::new(2)), None);
    }
}
