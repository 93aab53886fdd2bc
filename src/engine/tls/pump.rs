//! One TLS connection after its hand-off: the rustls session and the bytes pumped both ways
//! between it and the core's end of the socket pair, through two bounded buffers.

use super::*;

/// One TLS caller connection.
pub(super) struct Session {
    pub(super) tcp: TcpStream,
    pub(super) tls: ServerConnection,
    pub(super) peer: Peer,
    pub(super) state: State,
}

pub(super) enum State {
    /// The ticket is held here until the connection is handed to a core (`None` once given
    /// back, just before the session is dropped).
    Handshaking {
        ticket: Option<Ticket>,
        deadline: Instant,
    },
    Open(Pump),
}

pub(super) enum Step {
    Pending,
    /// The handshake has just finished: hand the connection over.
    Handshaken,
    /// Both sides are closed.
    Done,
}

impl Session {
    /// The poll events wanted on the TCP connection and on the pair.
    pub(super) fn interest(&self) -> (PollFlags, PollFlags) {
        let out = if self.tls.wants_write() {
            PollFlags::OUT
        } else {
            PollFlags::empty()
        };
        match &self.state {
            State::Handshaking { .. } => (PollFlags::IN | out, PollFlags::empty()),
            State::Open(pump) => {
                let mut tcp = out;
                if pump.reads_caller() {
                    tcp |= PollFlags::IN;
                }
                let mut pair = PollFlags::empty();
                if !pump.pair_eof && !pump.to_caller.is_full() {
                    pair |= PollFlags::IN;
                }
                if !pump.to_core.is_empty() {
                    pair |= PollFlags::OUT;
                }
                (tcp, pair)
            }
        }
    }

    pub(super) fn step(&mut self) -> io::Result<Step> {
        match &mut self.state {
            State::Handshaking { .. } => self.handshake(),
            State::Open(pump) => pump.run(&mut self.tls, &mut self.tcp),
        }
    }

    /// Read and write handshake flights until the socket would block or it is done.
    pub(super) fn handshake(&mut self) -> io::Result<Step> {
        loop {
            while self.tls.wants_write() {
                match self.tls.write_tls(&mut self.tcp) {
                    Ok(_) => {}
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                        return Ok(Step::Pending)
                    }
                    Err(error) => return Err(error),
                }
            }
            if !self.tls.is_handshaking() {
                return Ok(Step::Handshaken);
            }
            match self.tls.read_tls(&mut self.tcp) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the caller closed the connection during the handshake",
                    ))
                }
                Ok(_) => {
                    if let Err(error) = self.tls.process_new_packets() {
                        // Tell the caller why (the alert), as far as the socket takes it.
                        let _ = self.tls.write_tls(&mut self.tcp);
                        return Err(io::Error::new(io::ErrorKind::InvalidData, error));
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(Step::Pending)
                }
                Err(error) => return Err(error),
            }
        }
    }
}

/// A bounded byte buffer: filled at the end, drained from the start.
pub(super) struct Buf {
    pub(super) data: Box<[u8]>,
    pub(super) start: usize,
    pub(super) end: usize,
}

impl Buf {
    pub(super) fn new(bytes: usize) -> Buf {
        Buf {
            data: vec![0; bytes].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub(super) fn is_full(&self) -> bool {
        self.end - self.start == self.data.len()
    }

    /// Room to fill (moving what is held to the front when it must).
    pub(super) fn space(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.data.len() && self.start > 0 {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.data[self.end..]
    }

    pub(super) fn filled(&mut self, bytes: usize) {
        self.end += bytes;
    }

    pub(super) fn bytes(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    pub(super) fn consume(&mut self, bytes: usize) {
        self.start += bytes;
    }
}

/// An open session's two directions.
pub(super) struct Pump {
    /// Our end of the socket pair (the core has the other).
    pub(super) pair: UnixStream,
    /// Caller's plaintext not yet written to the pair.
    pub(super) to_core: Buf,
    /// Core's bytes not yet taken by rustls.
    pub(super) to_caller: Buf,
    /// rustls may hold decrypted bytes we have not taken (our buffer was full).
    pub(super) plaintext_pending: bool,
    /// The caller has closed (close_notify, or EOF).
    pub(super) caller_closed: bool,
    /// The TCP connection has reached EOF.
    pub(super) tcp_eof: bool,
    /// The pair's write side has been shut (the core has everything the caller sent).
    pub(super) pair_shut: bool,
    /// The core has closed its end.
    pub(super) pair_eof: bool,
    pub(super) close_sent: bool,
    /// Which buffers were full at the last count (to count each time one fills).
    pub(super) full: (bool, bool),
}

pub(super) fn would_block(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

impl Pump {
    pub(super) fn new(pair: UnixStream) -> Pump {
        Pump {
            pair,
            to_core: Buf::new(PUMP_BUFFER_BYTES),
            to_caller: Buf::new(PUMP_BUFFER_BYTES),
            // Bytes that came with the handshake's last flight may be waiting.
            plaintext_pending: true,
            caller_closed: false,
            tcp_eof: false,
            pair_shut: false,
            pair_eof: false,
            close_sent: false,
            full: (false, false),
        }
    }

    /// Whether to read the caller's TCP connection now.
    pub(super) fn reads_caller(&self) -> bool {
        !self.caller_closed && !self.tcp_eof && !self.to_core.is_full() && !self.plaintext_pending
    }

    /// Move bytes both ways until nothing moves; `Done` once both sides are closed.
    pub(super) fn run(
        &mut self,
        tls: &mut ServerConnection,
        tcp: &mut TcpStream,
    ) -> io::Result<Step> {
        loop {
            let mut moved = self.caller_to_core(tls, tcp)?;
            moved |= self.core_to_caller(tls, tcp)?;
            self.count_full();
            if self.close_sent && !tls.wants_write() {
                return Ok(Step::Done);
            }
            if !moved {
                return Ok(Step::Pending);
            }
        }
    }

    pub(super) fn caller_to_core(
        &mut self,
        tls: &mut ServerConnection,
        tcp: &mut TcpStream,
    ) -> io::Result<bool> {
        let mut moved = false;
        // Decrypted bytes rustls holds, into our buffer.
        while !self.caller_closed && !self.to_core.is_full() {
            match tls.reader().read(self.to_core.space()) {
                Ok(0) => self.caller_closed = true,
                Ok(n) => {
                    self.to_core.filled(n);
                    moved = true;
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    self.plaintext_pending = false;
                    break;
                }
                // EOF without close_notify: the caller has gone all the same (the protocol's
                // framing tells a cut-short frame).
                Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => {
                    self.caller_closed = true;
                }
                Err(error) => return Err(error),
            }
        }
        if self.to_core.is_full() {
            self.plaintext_pending = true;
        }
        // More records from the caller, only when there is room for what they hold.
        if self.reads_caller() {
            match tls.read_tls(tcp) {
                Ok(0) => {
                    self.tcp_eof = true;
                    self.plaintext_pending = true;
                    moved = true;
                }
                Ok(_) => {
                    if let Err(error) = tls.process_new_packets() {
                        let _ = tls.write_tls(tcp);
                        return Err(io::Error::new(io::ErrorKind::InvalidData, error));
                    }
                    self.plaintext_pending = true;
                    moved = true;
                }
                Err(error) if would_block(&error) => {}
                Err(error) => return Err(error),
            }
        }
        while !self.to_core.is_empty() {
            match self.pair.write(self.to_core.bytes()) {
                Ok(n) => {
                    self.to_core.consume(n);
                    moved = true;
                }
                Err(error) if would_block(&error) => break,
                Err(error) => return Err(error),
            }
        }
        if self.caller_closed && self.to_core.is_empty() && !self.pair_shut {
            // The core sees EOF, as from a plaintext caller that closed.
            let _ = self.pair.shutdown(std::net::Shutdown::Write);
            self.pair_shut = true;
            moved = true;
        }
        Ok(moved)
    }

    pub(super) fn core_to_caller(
        &mut self,
        tls: &mut ServerConnection,
        tcp: &mut TcpStream,
    ) -> io::Result<bool> {
        let mut moved = false;
        if !self.pair_eof && !self.to_caller.is_full() {
            match self.pair.read(self.to_caller.space()) {
                Ok(0) => {
                    self.pair_eof = true;
                    moved = true;
                }
                Ok(n) => {
                    self.to_caller.filled(n);
                    moved = true;
                }
                Err(error) if would_block(&error) => {}
                Err(error) if error.kind() == io::ErrorKind::ConnectionReset => {
                    self.pair_eof = true;
                    moved = true;
                }
                Err(error) => return Err(error),
            }
        }
        if !self.to_caller.is_empty() {
            // rustls takes what its outgoing limit (PUMP_BUFFER_BYTES) leaves room for.
            let n = tls.writer().write(self.to_caller.bytes())?;
            if n > 0 {
                self.to_caller.consume(n);
                moved = true;
            }
        }
        if self.pair_eof && self.to_caller.is_empty() && !self.close_sent {
            tls.send_close_notify();
            self.close_sent = true;
            moved = true;
        }
        while tls.wants_write() {
            match tls.write_tls(tcp) {
                Ok(_) => moved = true,
                Err(error) if would_block(&error) => break,
                Err(error) => return Err(error),
            }
        }
        Ok(moved)
    }

    /// Count each time a buffer fills (a direction stops being read for the other side).
    pub(super) fn count_full(&mut self) {
        let full = (self.to_core.is_full(), self.to_caller.is_full());
        if full.0 && !self.full.0 {
            count(&COUNTS.buffers_full);
        }
        if full.1 && !self.full.1 {
            count(&COUNTS.buffers_full);
        }
        self.full = full;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_fills_drains_and_compacts() {
        let mut buf = Buf::new(4);
        buf.space()[..3].copy_from_slice(b"abc");
        buf.filled(3);
        buf.consume(2);
        assert_eq!(buf.bytes(), b"c");
        assert_eq!(buf.space().len(), 1);
        buf.space()[0] = b'd';
        buf.filled(1);
        assert_eq!(buf.space().len(), 2, "compacted");
        assert_eq!(buf.bytes(), b"cd");
        buf.space().copy_from_slice(b"ef");
        buf.filled(2);
        assert!(buf.is_full());
        assert_eq!(buf.bytes(), b"cdef");
    }
}
