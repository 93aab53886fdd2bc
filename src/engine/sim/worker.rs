//! A worker model: the worker protocol (docs/protocol.md §6.3, §8, §9) spoken over a real
//! control socket and a real slot (attached with the worker SDK's own `WorkerSlot`), driven by
//! the simulation's thread. It echoes each job (in the slot when the reply fits, else on the
//! socket; queued jobs on the socket), and may carry one fault the seed gave it: a guessed
//! answer before its `Job` arrived, a wrong job id, `IN_SLOT` on a `Fail` or `Hello`, a
//! wrong ABI, garbage, dying in the middle of an answer, or hanging on a job.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;

use acgi_worker::WorkerSlot;

use crate::engine::io::sim::{self, Rng};
use crate::proto::{Header, Hello, Kind, FLAG_IN_SLOT, FLAG_QUEUED, HEADER_BYTES};
use crate::shm::SLOT_ABI_VERSION;

/// A fault a worker model carries, and the `WorkerFault` labels the engine may name for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fault {
    /// Answers a job it has not been sent: the next sequence (its guess), while idle or busy.
    Guess,
    /// Answers its job with another job's sequence.
    WrongJob,
    /// Answers its job with `Fail` carrying `IN_SLOT`.
    FailInSlot,
    /// Says `Hello` with `IN_SLOT`.
    HelloInSlot,
    /// Says `Hello` with another slot ABI.
    WrongAbi,
    /// Sends bytes that are no frame.
    Garbage,
    /// Dies with half an answer written.
    DiesMidAnswer,
    /// Never answers a job (the request times out; the engine stops it).
    Hangs,
    /// Closes its control socket and lives on.
    ClosesSocket,
    /// Says `Hello` with a payload that is not 8 bytes.
    MalformedHello,
    /// Answers a queued job in the slot.
    InSlotToQueued,
    /// Answers in the slot and on the socket at once.
    InSlotWithPayload,
}

impl Fault {
    pub(super) const ALL: [Fault; 12] = [
        Fault::Guess,
        Fault::WrongJob,
        Fault::FailInSlot,
        Fault::HelloInSlot,
        Fault::WrongAbi,
        Fault::Garbage,
        Fault::DiesMidAnswer,
        Fault::Hangs,
        Fault::ClosesSocket,
        Fault::MalformedHello,
        Fault::InSlotToQueued,
        Fault::InSlotWithPayload,
    ];

    /// The labels the engine may count for it (any one), and whether it may count none (a
    /// death the reap can see before the closed socket).
    pub(super) fn labels(self) -> (&'static [&'static str], bool) {
        match self {
            // (Optional: when the guessed job's `Job` frame happens to be all sent by the time
            // the bridge reads the guess, the bridge cannot tell it from an answer.)
            Fault::Guess => (
                &["unexpected_frame", "early_answer", "wrong_job", "slot"],
                true,
            ),
            Fault::WrongJob => (&["wrong_job"], false),
            Fault::FailInSlot | Fault::HelloInSlot => (&["forbidden_flags"], false),
            Fault::WrongAbi => (&["wrong_abi"], false),
            Fault::Garbage => (&["bad_frame"], false),
            Fault::DiesMidAnswer => (&["control_socket"], true),
            Fault::Hangs => (&[], true),
            Fault::ClosesSocket => (&["control_socket"], false),
            Fault::MalformedHello => (&["malformed_hello"], false),
            Fault::InSlotToQueued => (&["in_slot_answer_to_queued_job"], false),
            Fault::InSlotWithPayload => (&["in_slot_with_payload"], false),
        }
    }
}

/// One job the model holds.
struct Job {
    sequence: u64,
    queued: bool,
    /// The request, when it came on the socket.
    inline: Option<Vec<u8>>,
}

pub(super) struct Worker {
    pub(super) pid: i32,
    control: Option<UnixStream>,
    /// The write ends of its stdout and stderr.
    outputs: Option<[OwnedFd; 2]>,
    slot: Option<WorkerSlot>,
    queued_jobs: bool,
    hello_sent: bool,
    input: Vec<u8>,
    out: Vec<u8>,
    jobs: VecDeque<Job>,
    pub(super) fault: Option<Fault>,
    /// How often its handler fails (a `Fail` the caller sees as error 8), in percent.
    fail_percent: u64,
    /// Its fault has been acted out (after which it only waits to be killed).
    pub(super) fault_done: bool,
    /// The simulation has taken note of the fault acted out.
    pub(super) fault_reported: bool,
    /// The highest job sequence it has seen.
    pub(super) last_sequence: u64,
    /// Requests (caller, request id) whose payload it has taken, not yet collected by the
    /// simulation (from their first two bytes: `caller::payload_byte`; shorter ones are not
    /// told apart).
    pub(super) ran: Vec<(usize, u64)>,
    /// The engine sent it SIGTERM or closed its control socket: it is being stopped.
    pub(super) stopped: bool,
    pub(super) dead: bool,
}

impl Worker {
    pub(super) fn new(
        pid: i32,
        control: UnixStream,
        outputs: [OwnedFd; 2],
        slot: WorkerSlot,
        queued_jobs: bool,
        fault: Option<Fault>,
        fail_percent: u64,
    ) -> Worker {
        control
            .set_nonblocking(true)
            .expect("a non-blocking socket");
        Worker {
            pid,
            control: Some(control),
            outputs: Some(outputs),
            slot: Some(slot),
            queued_jobs,
            hello_sent: false,
            input: Vec::new(),
            out: Vec::new(),
            jobs: VecDeque::new(),
            fault,
            fail_percent,
            fault_done: false,
            fault_reported: false,
            last_sequence: 0,
            ran: Vec::new(),
            stopped: false,
            dead: false,
        }
    }

    /// It dies: its descriptors close and its `WaitId` may complete.
    pub(super) fn die(&mut self, si_code: i32, status: i32, trace: &mut Vec<String>) {
        if self.dead {
            return;
        }
        trace.push(format!("worker {} dies ({si_code}, {status})", self.pid));
        self.dead = true;
        self.control = None;
        self.outputs = None;
        self.slot = None;
        sim::exit(self.pid, si_code, status);
    }

    /// The engine signalled it.
    pub(super) fn on_signal(&mut self, signal: i32, trace: &mut Vec<String>) {
        match signal {
            libc::SIGKILL => self.die(libc::CLD_KILLED, libc::SIGKILL, trace),
            libc::SIGTERM => {
                self.stopped = true;
                // A hanging handler ignores it (the engine's grace period then kills it).
                if self.fault != Some(Fault::Hangs) {
                    self.die(libc::CLD_EXITED, 0, trace);
                }
            }
            other => panic!("worker {}: unexpected signal {other}", self.pid),
        }
    }

    /// Do one thing: flush output, say Hello, read jobs, answer one, or act out its fault.
    /// `guess`: the sequence a guessing worker would answer; `filling`: a caller's payload is
    /// being read into its slot now (a direct read, its `Job` not sent yet).
    pub(super) fn act(
        &mut self,
        rng: &mut Rng,
        guess: u64,
        filling: bool,
        trace: &mut Vec<String>,
    ) -> bool {
        if self.dead {
            return false;
        }
        if !self.out.is_empty() {
            if self.fault == Some(Fault::DiesMidAnswer) && self.fault_done {
                self.flush(rng.length(self.out.len() as u32, 100) as usize);
                self.die(libc::CLD_KILLED, libc::SIGSEGV, trace);
                return true;
            }
            return self.flush(self.out.len());
        }
        if !self.hello_sent {
            self.say_hello(trace);
            return true;
        }
        if self.read_jobs(trace) {
            return true;
        }
        if self.fault == Some(Fault::ClosesSocket) && !self.fault_done && rng.chance(3) {
            self.fault_done = true;
            trace.push(format!("worker {} closes its control socket", self.pid));
            self.control = None;
            return true;
        }
        let nothing_unread = self.jobs.is_empty() && self.unread() == 0;
        let now = if filling { 50 } else { 2 };
        if self.fault == Some(Fault::Guess) && !self.fault_done && nothing_unread && rng.chance(now)
        {
            self.fault_done = true;
            trace.push(format!(
                "worker {} guesses job {guess} (filling {filling})",
                self.pid
            ));
            self.frame(Header::new(Kind::Done, 0, guess, 0), &[]);
            return true;
        }
        if !self.jobs.is_empty() && rng.chance(50) {
            return self.answer(rng, trace);
        }
        false
    }

    /// Bytes waiting in its control socket.
    fn unread(&self) -> usize {
        let Some(control) = &self.control else {
            return 0;
        };
        rustix::io::ioctl_fionread(control).unwrap_or(0) as usize + self.input.len()
    }

    fn say_hello(&mut self, trace: &mut Vec<String>) {
        self.hello_sent = true;
        let mut version = SLOT_ABI_VERSION;
        let mut flags = if self.queued_jobs { FLAG_QUEUED } else { 0 };
        match self.fault {
            Some(Fault::HelloInSlot) => flags |= FLAG_IN_SLOT,
            Some(Fault::WrongAbi) => version += 1,
            _ => {}
        }
        let hello_faults = [Fault::HelloInSlot, Fault::WrongAbi, Fault::MalformedHello];
        if self
            .fault
            .is_some_and(|fault| hello_faults.contains(&fault))
        {
            self.fault_done = true;
        }
        let hello = Hello {
            slot_abi_version: version,
            pid: self.pid as u32,
        }
        .encode();
        let hello = match self.fault {
            Some(Fault::MalformedHello) => &hello[..4],
            _ => &hello[..],
        };
        let mut header = Header::new(Kind::Hello, 0, 0, hello.len() as u32);
        header.flags = flags;
        trace.push(format!("worker {} hello (flags {flags})", self.pid));
        self.frame(header, hello);
        if let Some([stdout, _]) = &self.outputs {
            let _ = rustix::io::write(stdout, b"sim worker up\n");
        }
    }

    fn frame(&mut self, header: Header, payload: &[u8]) {
        self.out.extend_from_slice(&header.encode());
        self.out.extend_from_slice(payload);
    }

    /// Write up to `len` bytes of its output.
    fn flush(&mut self, len: usize) -> bool {
        let Some(control) = &mut self.control else {
            return false;
        };
        match control.write(&self.out[..len]) {
            Ok(n) => {
                self.out.drain(..n);
                true
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => false,
            Err(_) => {
                // The bridge closed its end: it is stopping or has dropped this worker.
                self.out.clear();
                true
            }
        }
    }

    /// Read what the control socket has; true when anything came (or it closed).
    fn read_jobs(&mut self, trace: &mut Vec<String>) -> bool {
        let Some(control) = &mut self.control else {
            return false;
        };
        let mut buf = [0u8; 16384];
        match control.read(&mut buf) {
            Ok(0) => {
                // End of file: the bridge stops this worker (protocol §10): exit 0.
                self.stopped = true;
                self.die(libc::CLD_EXITED, 0, trace);
                true
            }
            Ok(n) => {
                self.input.extend_from_slice(&buf[..n]);
                self.take_frames(trace);
                true
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => false,
            Err(_) => {
                self.die(libc::CLD_EXITED, 1, trace);
                true
            }
        }
    }

    fn take_frames(&mut self, trace: &mut Vec<String>) {
        while self.input.len() >= HEADER_BYTES {
            let header =
                Header::decode(&self.input[..HEADER_BYTES], u32::MAX).unwrap_or_else(|e| {
                    panic!("worker {}: the bridge sent a bad frame: {e}", self.pid)
                });
            let len = header.payload_len as usize;
            if self.input.len() < HEADER_BYTES + len {
                return;
            }
            let payload = self.input[HEADER_BYTES..HEADER_BYTES + len].to_vec();
            self.input.drain(..HEADER_BYTES + len);
            assert_eq!(
                header.kind,
                Kind::Job,
                "worker {}: a {:?}",
                self.pid,
                header.kind
            );
            let queued = header.flags & FLAG_QUEUED != 0;
            let in_slot = header.flags & FLAG_IN_SLOT != 0;
            assert!(
                !queued || self.queued_jobs,
                "a queued job to a worker that asked for none"
            );
            trace.push(format!(
                "worker {} job {} ({len} B{}{})",
                self.pid,
                header.request_id,
                if in_slot { ", in slot" } else { "" },
                if queued { ", queued" } else { "" }
            ));
            self.last_sequence = self.last_sequence.max(header.request_id);
            self.jobs.push_back(Job {
                sequence: header.request_id,
                queued,
                inline: (!in_slot).then_some(payload),
            });
        }
    }

    /// Answer the oldest job (an echo), or act out a fault on it.
    fn answer(&mut self, rng: &mut Rng, trace: &mut Vec<String>) -> bool {
        if self.fault == Some(Fault::Hangs) {
            self.fault_done = true;
            return false;
        }
        let job = self.jobs.pop_front().expect("a job");
        let slot = self.slot.as_ref().expect("alive");
        let request = if job.queued {
            job.inline
                .clone()
                .expect("a queued job's payload is inline")
        } else {
            let taken = slot
                .take_job(job.sequence)
                .unwrap_or_else(|e| panic!("worker {}: job {}: {e}", self.pid, job.sequence));
            match taken {
                // SAFETY: the slot is Taken (take_job above) and `len` is what it returned.
                Some(len) => unsafe { slot.request_bytes(len) }.to_vec(),
                None => job.inline.clone().expect("an inline job's payload"),
            }
        };
        if let [caller, request_id, ..] = request[..] {
            self.ran.push((caller as usize, request_id as u64));
        }
        let mut sequence = job.sequence;
        if self.fault == Some(Fault::WrongJob) && !self.fault_done {
            self.fault_done = true;
            sequence ^= 0x1_0000;
        }
        let fail = rng.chance(self.fail_percent);
        if self.fault == Some(Fault::FailInSlot) && !self.fault_done {
            self.fault_done = true;
            if !job.queued {
                slot.publish_reply(None).expect("taken");
            }
            let mut header = Header::new(Kind::Fail, 0, sequence, 4);
            header.flags = FLAG_IN_SLOT;
            self.frame(header, b"oops");
            return true;
        }
        if self.fault == Some(Fault::Garbage) && !self.fault_done {
            self.fault_done = true;
            self.out.extend_from_slice(&[0x5A; HEADER_BYTES]);
            return true;
        }
        if self.fault == Some(Fault::DiesMidAnswer) && !self.fault_done && rng.chance(50) {
            self.fault_done = true;
        }
        let mut in_slot = !job.queued && !fail && request.len() <= slot.capacity() as usize;
        if !job.queued {
            let reply = in_slot.then_some(&request[..]);
            slot.publish_reply(reply).expect("taken");
        }
        if self.fault == Some(Fault::InSlotToQueued) && !self.fault_done && job.queued && !fail {
            self.fault_done = true;
            in_slot = true;
        }
        if self.fault == Some(Fault::InSlotWithPayload) && !self.fault_done && in_slot {
            self.fault_done = true;
            let mut header = Header::new(Kind::Done, 0, sequence, 3);
            header.flags = FLAG_IN_SLOT;
            self.frame(header, b"abc");
            return true;
        }
        trace.push(format!(
            "worker {} answers {sequence} (fail {fail}, in slot {in_slot})",
            self.pid
        ));
        if fail {
            self.frame(Header::new(Kind::Fail, 0, sequence, 7), b"handler");
        } else if in_slot {
            let mut header = Header::new(Kind::Done, 0, sequence, 0);
            header.flags = FLAG_IN_SLOT;
            self.frame(header, &[]);
        } else {
            let header = Header::new(Kind::Done, 0, sequence, request.len() as u32);
            self.frame(header, &request);
        }
        true
    }
}
