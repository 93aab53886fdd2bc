//! The `user_data` of every op: a checked token (op kind, owner's index, owner's generation),
//! never a pointer, so that a completion for an owner that has gone is recognised, not trusted.

use crate::engine::index::{ListenerIndex, TypedIndex};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum OpKind {
    Accept = 1,
    ConnRecv = 2,
    ConnSend = 3,
    WorkerRecv = 4,
    WorkerSend = 5,
    WorkerStdout = 6,
    WorkerStderr = 7,
    WorkerWait = 8,
    // (9 was the signalfd read: the stop signals are the control thread's now.)
    SpawnWake = 10,
    Cancel = 11,
    /// The reply header of a send from a slot (linked to `ConnSendFixed`).
    ConnSendHeader = 12,
    /// The reply payload, written from the worker's slot (a registered buffer).
    ConnSendFixed = 13,
    /// A read on this core's wake eventfd: messages from other cores.
    Inbox = 14,
    /// A write to another core's wake eventfd (its completion needs nothing).
    WakeSent = 15,
    /// A caller's request payload read straight into a worker's slot.
    ConnRecvSlot = 16,
    /// A multishot receive from a caller into the core's provided buffers.
    ConnRecvMulti = 17,
    /// Waiting for the rest of a large request's payload to arrive before committing a worker
    /// to it (a poll for readability).
    ConnPoll = 18,
}

impl OpKind {
    pub fn from_u8(value: u8) -> Option<OpKind> {
        Some(match value {
            1 => OpKind::Accept,
            2 => OpKind::ConnRecv,
            3 => OpKind::ConnSend,
            4 => OpKind::WorkerRecv,
            5 => OpKind::WorkerSend,
            6 => OpKind::WorkerStdout,
            7 => OpKind::WorkerStderr,
            8 => OpKind::WorkerWait,
            10 => OpKind::SpawnWake,
            11 => OpKind::Cancel,
            12 => OpKind::ConnSendHeader,
            13 => OpKind::ConnSendFixed,
            14 => OpKind::Inbox,
            15 => OpKind::WakeSent,
            16 => OpKind::ConnRecvSlot,
            17 => OpKind::ConnRecvMulti,
            18 => OpKind::ConnPoll,
            _ => return None,
        })
    }
}

/// `user_data` layout: kind (8 bits) | index (24 bits) | generation (32 bits). For an op of
/// a connection or a worker, index and generation are its handle's; other ops carry an index
/// of their own (a listener's) or none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    pub kind: OpKind,
    pub index: u32,
    pub generation: u32,
}

impl Token {
    pub fn new(kind: OpKind, index: u32, generation: u32) -> Token {
        assert!(
            index <= crate::engine::table::INDEX_MAX,
            "an index over 24 bits"
        );
        Token {
            kind,
            index,
            generation,
        }
    }

    /// An op that belongs to the core (`index`: the other core of a `WakeSent`, else 0).
    pub fn core(kind: OpKind, index: usize) -> Token {
        Token::new(kind, index as u32, 0)
    }

    /// The accept op of a listener.
    pub fn accept(listener: ListenerIndex) -> Token {
        Token::new(OpKind::Accept, listener.usize() as u32, 0)
    }

    /// The listener an accept op's token names.
    pub fn listener(self) -> ListenerIndex {
        debug_assert_eq!(self.kind, OpKind::Accept);
        ListenerIndex::from_usize(self.index as usize)
    }

    pub fn encode(self) -> u64 {
        ((self.kind as u64) << 56) | ((self.index as u64) << 32) | self.generation as u64
    }

    pub fn decode(user_data: u64) -> Option<Token> {
        Some(Token {
            kind: OpKind::from_u8((user_data >> 56) as u8)?,
            index: ((user_data >> 32) as u32) & crate::engine::table::INDEX_MAX,
            generation: user_data as u32,
        })
    }
}
