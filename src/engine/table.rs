//! A table of entries named by typed, generation-checked handles: what a core keeps its
//! connections, workers and requests in.
//!
//! A [`Handle<T>`] names one entry of one `Table<T>`: its index and the generation the entry had
//! when the value was inserted. Every entry keeps its own 32-bit generation, bumped each time
//! its value is removed, so a handle kept past its value's removal (an answer for a caller that
//! has gone, a completion for a worker that was freed) no longer matches, even after the index
//! is reused: it would take 2^32 reuses of that one index while the stale handle is still held.
//! (The tables used to share one 24-bit counter, which wrapped after 16.7 M allocations of any
//! kind, about 84 s at 200 k requests/s.)
//!
//! `Handle<Conn>`, `Handle<Worker>` and `Handle<Request>` are distinct types: a connection
//! handle passed where a worker's is expected does not compile.

#![forbid(unsafe_code)]

use std::fmt;
use std::marker::PhantomData;

/// Indices fit in 24 bits, so that a handle fits an io_uring `user_data` beside an op kind
/// (see the engine's `Token`).
pub const INDEX_MAX: u32 = (1 << 24) - 1;

/// Names an entry of a `Table<T>`: index and generation.
pub struct Handle<T> {
    index: u32,
    generation: u32,
    _of: PhantomData<fn() -> T>,
}

// Derives would demand `T: Clone` etc.; a handle is plain data whatever it names.
impl<T> Clone for Handle<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Handle<T> {}
impl<T> PartialEq for Handle<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.index, self.generation) == (other.index, other.generation)
    }
}
impl<T> Eq for Handle<T> {}
impl<T> std::hash::Hash for Handle<T> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self.index, self.generation).hash(state);
    }
}
impl<T> fmt::Debug for Handle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = std::any::type_name::<T>()
            .rsplit("::")
            .next()
            .unwrap_or("?");
        write!(f, "{name}#{}g{}", self.index, self.generation)
    }
}

impl<T> Handle<T> {
    /// A handle from its parts (a completion's token, a raw pool id).
    pub fn new(index: u32, generation: u32) -> Handle<T> {
        Handle {
            index,
            generation,
            _of: PhantomData,
        }
    }

    pub fn index(self) -> u32 {
        self.index
    }

    pub fn generation(self) -> u32 {
        self.generation
    }

    /// As one integer (generation high, index low): the pool policy names workers and
    /// requests this way.
    pub fn to_raw(self) -> u64 {
        (u64::from(self.generation) << 32) | u64::from(self.index)
    }

    pub fn from_raw(raw: u64) -> Handle<T> {
        Handle::new(raw as u32, (raw >> 32) as u32)
    }
}

/// The generation a new entry starts at: 0, or in tests what the thread asked for, so that
/// the engine simulation can make every entry's generation wrap within a few reuses.
fn first_generation() -> u32 {
    #[cfg(test)]
    return FIRST_GENERATION.with(std::cell::Cell::get);
    #[cfg(not(test))]
    0
}

#[cfg(test)]
thread_local! {
    static FIRST_GENERATION: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Start new entries of this thread's tables at `generation` (tests only: the simulation).
#[cfg(test)]
pub(crate) fn first_generation_for_tests(generation: u32) {
    FIRST_GENERATION.with(|first| first.set(generation));
}

struct Entry<T> {
    generation: u32,
    value: Option<T>,
}

/// Entries reused last-freed first (the warmest), each with its own generation.
pub struct Table<T> {
    entries: Vec<Entry<T>>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Table<T> {
    pub fn with_capacity(capacity: usize) -> Table<T> {
        Table {
            entries: Vec::with_capacity(capacity),
            free: Vec::new(),
            len: 0,
        }
    }

    /// Store `value`; the handle names it until it is removed.
    pub fn insert(&mut self, value: T) -> Handle<T> {
        self.len += 1;
        if let Some(index) = self.free.pop() {
            let entry = &mut self.entries[index as usize];
            debug_assert!(entry.value.is_none());
            entry.value = Some(value);
            return Handle::new(index, entry.generation);
        }
        let index = self.entries.len() as u32;
        assert!(
            index <= INDEX_MAX,
            "a table of more than {INDEX_MAX} entries"
        );
        let generation = first_generation();
        self.entries.push(Entry {
            generation,
            value: Some(value),
        });
        Handle::new(index, generation)
    }

    /// Remove the value `handle` names; from now on the handle names nothing. Panics when it
    /// names nothing already: the caller's bookkeeping is wrong.
    pub fn remove(&mut self, handle: Handle<T>) -> T {
        let entry = self
            .entries
            .get_mut(handle.index as usize)
            .filter(|e| e.generation == handle.generation && e.value.is_some())
            .unwrap_or_else(|| panic!("removing {handle:?}, which names nothing"));
        let value = entry.value.take().expect("checked");
        entry.generation = entry.generation.wrapping_add(1);
        self.free.push(handle.index);
        self.len -= 1;
        value
    }

    pub fn get(&self, handle: Handle<T>) -> Option<&T> {
        self.entries
            .get(handle.index as usize)
            .filter(|e| e.generation == handle.generation)
            .and_then(|e| e.value.as_ref())
    }

    pub fn get_mut(&mut self, handle: Handle<T>) -> Option<&mut T> {
        self.entries
            .get_mut(handle.index as usize)
            .filter(|e| e.generation == handle.generation)
            .and_then(|e| e.value.as_mut())
    }

    pub fn contains(&self, handle: Handle<T>) -> bool {
        self.get(handle).is_some()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every value with its handle, in index order.
    pub fn iter(&self) -> impl Iterator<Item = (Handle<T>, &T)> {
        self.entries.iter().enumerate().filter_map(|(index, e)| {
            let value = e.value.as_ref()?;
            Some((Handle::new(index as u32, e.generation), value))
        })
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (Handle<T>, &mut T)> {
        self.entries
            .iter_mut()
            .enumerate()
            .filter_map(|(index, e)| {
                let generation = e.generation;
                let value = e.value.as_mut()?;
                Some((Handle::new(index as u32, generation), value))
            })
    }

    /// Every handle now in the table (a snapshot, for loops that may remove entries).
    pub fn handles(&self) -> Vec<Handle<T>> {
        self.iter().map(|(handle, _)| handle).collect()
    }

    #[cfg(test)]
    fn set_generation_for_test(&mut self, index: u32, generation: u32) {
        self.entries[index as usize].generation = generation;
    }
}

impl<T> std::ops::Index<Handle<T>> for Table<T> {
    type Output = T;

    /// Panics when the handle names nothing: for handles our own bookkeeping keeps valid.
    fn index(&self, handle: Handle<T>) -> &T {
        self.get(handle)
            .unwrap_or_else(|| panic!("{handle:?} names nothing"))
    }
}

impl<T> std::ops::IndexMut<Handle<T>> for Table<T> {
    fn index_mut(&mut self, handle: Handle<T>) -> &mut T {
        match self.get_mut(handle) {
            Some(value) => value,
            None => panic!("{handle:?} names nothing"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same checks for any type the engine keeps in a table: its handle stops naming a
    /// removed value, even when the index is reused and when the generation wraps.
    fn generations_guard_reuse_and_wrap<T: PartialEq + fmt::Debug>(make: impl Fn(u32) -> T) {
        let mut table = Table::with_capacity(2);
        let first = table.insert(make(1));
        assert_eq!(table.get(first), Some(&make(1)));
        assert_eq!(table.remove(first), make(1));
        assert!(!table.contains(first));
        let second = table.insert(make(2));
        assert_eq!(second.index(), first.index(), "the index is reused");
        assert_ne!(second, first);
        assert_eq!(table.get(first), None, "a stale handle names nothing");
        assert_eq!(table.get(second), Some(&make(2)));
        // Wrap: an entry at the last generation comes back at 0, and the handle from before
        // the wrap does not match the new value.
        table.remove(second);
        table.set_generation_for_test(first.index(), u32::MAX);
        let before_wrap = table.insert(make(3));
        assert_eq!(before_wrap.generation(), u32::MAX);
        table.remove(before_wrap);
        let after_wrap = table.insert(make(4));
        assert_eq!(after_wrap.generation(), 0);
        assert_eq!(table.get(before_wrap), None);
        assert_eq!(table.get(Handle::from_raw(before_wrap.to_raw())), None);
        assert_eq!(table[after_wrap], make(4));
        assert_eq!(Handle::<T>::from_raw(after_wrap.to_raw()), after_wrap);
        assert_eq!(table.len(), 1);
    }

    // Stand-ins with the engine's three handle kinds' shapes (their real types need a ring and
    // processes to build); the table code is the same generic code for all of them.
    #[derive(Debug, PartialEq)]
    struct Conn(u32);
    #[derive(Debug, PartialEq)]
    struct Worker(u32);
    #[derive(Debug, PartialEq)]
    struct Request(u32);

    #[test]
    fn connection_handles_survive_reuse_and_generation_wrap() {
        generations_guard_reuse_and_wrap(Conn);
    }

    #[test]
    fn worker_handles_survive_reuse_and_generation_wrap() {
        generations_guard_reuse_and_wrap(Worker);
    }

    #[test]
    fn request_handles_survive_reuse_and_generation_wrap() {
        generations_guard_reuse_and_wrap(Request);
    }

    #[test]
    fn each_entry_has_its_own_generation() {
        let mut table = Table::with_capacity(4);
        let a = table.insert('a');
        let b = table.insert('b');
        table.remove(a);
        let c = table.insert('c');
        assert_eq!((c.index(), c.generation()), (a.index(), 1));
        assert_eq!(b.generation(), 0, "removing a did not touch b's generation");
        assert_eq!(table.iter().map(|(_, v)| *v).collect::<String>(), "cb");
    }

    #[test]
    #[should_panic(expected = "names nothing")]
    fn removing_twice_is_a_bug() {
        let mut table = Table::with_capacity(1);
        let a = table.insert(1u8);
        table.remove(a);
        table.remove(a);
    }
}
