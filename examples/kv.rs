//! The bundled `kv` service: a key-value store whose worker processes call SQLite synchronously.
//!
//! It stands for the classic case the bridge exists for: a blocking library (here SQLite, in the
//! original design MySQL) called from plain synchronous code in worker processes. Each worker
//! opens the database once at startup and answers one request at a time; several workers of the
//! same service share one database file and write to it concurrently, which WAL mode and a busy
//! timeout make safe. `docs/kv.md` is the normative request/reply format.
//!
//! ```text
//!   request bytes --parse_request--> Request --Store::execute--> SQLite --> reply bytes | Err
//! ```
//!
//! Parsing is pure and never panics on any input: every malformed request is a typed
//! [`RequestError`], answered as a service error. A database that stays busy past the timeout is
//! an error reply too, never a panic. The database path is `$KV_DB_PATH`, else
//! `$ACGI_STATE_DIR/kv.sqlite3`.

#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use acgi_proto::PAYLOAD_BYTES_MAX_DEFAULT;
use acgi_worker::{ENV_MAX_PAYLOAD, ENV_STATE_DIR};
use rusqlite::{Connection, ErrorCode, OptionalExtension};

/// Environment variable that overrides the database path.
const ENV_DB_PATH: &str = "KV_DB_PATH";
/// File name of the database inside the bridge's `state_dir`.
const DB_FILE_NAME: &str = "kv.sqlite3";
/// Longest key, in bytes.
const KEY_BYTES_MAX: usize = 1024;
/// Longest value, in bytes.
const VALUE_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Largest `scan` limit.
const SCAN_LIMIT_MAX: u32 = 10_000;
/// How long a statement waits for another worker's write lock before answering "busy".
const BUSY_TIMEOUT: Duration = Duration::from_millis(5000);
/// Attempts at a startup step (WAL switch, schema) that may return BUSY despite the timeout.
const STARTUP_ATTEMPTS_MAX: u32 = 10;
/// Bytes of caller input quoted back in an error message.
const QUOTE_BYTES_MAX: usize = 40;

const SQL_CREATE: &str =
    "CREATE TABLE IF NOT EXISTS kv (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID";
const SQL_GET: &str = "SELECT value FROM kv WHERE key = ?1";
const SQL_PUT: &str = "INSERT INTO kv (key, value) VALUES (?1, ?2) \
    ON CONFLICT(key) DO UPDATE SET value = excluded.value";
const SQL_DELETE: &str = "DELETE FROM kv WHERE key = ?1";
const SQL_SCAN_BOUNDED: &str =
    "SELECT key, value FROM kv WHERE key >= ?1 AND key < ?2 ORDER BY key LIMIT ?3";
const SQL_SCAN_UNBOUNDED: &str = "SELECT key, value FROM kv WHERE key >= ?1 ORDER BY key LIMIT ?2";

fn main() -> ExitCode {
    let path = match database_path(
        std::env::var_os(ENV_DB_PATH),
        std::env::var_os(ENV_STATE_DIR),
    ) {
        Ok(path) => path,
        Err(message) => {
            eprintln!("kv: {message}");
            return ExitCode::from(2);
        }
    };
    let reply_bytes_max = std::env::var(ENV_MAX_PAYLOAD)
        .ok()
        .and_then(|value| value.parse::<usize>().ok())
        .unwrap_or(PAYLOAD_BYTES_MAX_DEFAULT as usize);
    let store = match Store::open(&path, BUSY_TIMEOUT, reply_bytes_max) {
        Ok(store) => store,
        Err(error) => {
            eprintln!("kv: cannot open the database {}: {error}", path.display());
            return ExitCode::FAILURE;
        }
    };
    let result = acgi_worker::serve(|request: &[u8]| {
        let reply = handle(&store, request);
        if let Err(KvError::Database(error)) = &reply {
            // The caller sees the message too; the log is for whoever runs the bridge.
            eprintln!("kv: database error: {error}");
        }
        reply
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kv: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Parse one request and run it against the store.
fn handle(store: &Store, request: &[u8]) -> Result<Vec<u8>, KvError> {
    let request = parse_request(request)?;
    store.execute(&request)
}

/// Where the database lives: `$KV_DB_PATH`, else `$ACGI_STATE_DIR/kv.sqlite3`. An empty
/// variable counts as unset (SQLite would open a private temporary database for "").
fn database_path(
    db_path: Option<OsString>,
    state_dir: Option<OsString>,
) -> Result<PathBuf, String> {
    if let Some(path) = db_path.filter(|path| !path.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    if let Some(dir) = state_dir.filter(|dir| !dir.is_empty()) {
        return Ok(PathBuf::from(dir).join(DB_FILE_NAME));
    }
    Err(format!(
        "no database path: set {ENV_DB_PATH} to the database file, or run under acgi-bridge \
         with a state_dir in its config (it sets {ENV_STATE_DIR})"
    ))
}

/// One parsed request. Slices borrow from the request bytes.
#[derive(Debug, PartialEq, Eq)]
enum Request<'a> {
    Get { key: &'a [u8] },
    Put { key: &'a [u8], value: &'a [u8] },
    Delete { key: &'a [u8] },
    Scan { limit: u32, prefix: &'a [u8] },
}

/// Why a request is malformed. Always the caller's fault; sending it again cannot help.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum RequestError {
    #[error("empty request (expected get, put, delete or scan)")]
    EmptyRequest,
    #[error("unknown command \"{0}\" (expected get, put, delete or scan)")]
    UnknownCommand(String),
    #[error("missing argument: expected `{usage}`")]
    MissingArgument { usage: &'static str },
    #[error("too many arguments: expected `{usage}` (keys and prefixes contain no space)")]
    TooManyArguments { usage: &'static str },
    #[error("{what} is empty")]
    EmptyArgument { what: &'static str },
    #[error("{what} is {len} bytes, over the maximum of {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{what} contains {byte} at byte {offset} (keys contain no space, LF or NUL)")]
    ForbiddenByte {
        what: &'static str,
        byte: &'static str,
        offset: usize,
    },
    #[error("bad limit \"{0}\": expected a decimal number from 1 to {SCAN_LIMIT_MAX}")]
    BadLimit(String),
}

/// Why a request failed. `Display` is the message the caller receives.
#[derive(Debug, thiserror::Error)]
enum KvError {
    /// The caller's fault; retrying the same bytes cannot help.
    #[error("bad request: {0}")]
    BadRequest(#[from] RequestError),
    /// `get` of a key that is not stored.
    #[error("not found")]
    NotFound,
    /// Other workers held the write lock past the busy timeout; retrying later can help.
    #[error("database busy (locked by another worker past the timeout), retry: {0}")]
    Busy(rusqlite::Error),
    /// The scan's entries do not fit in one reply; the caller should ask for fewer.
    #[error(
        "scan reply would be over the maximum of {0} bytes: lower the limit or lengthen the prefix"
    )]
    ReplyTooLarge(usize),
    /// Anything else SQLite reported: the database's or the host's fault, not the caller's.
    #[error("database error: {0}")]
    Database(rusqlite::Error),
}

impl From<rusqlite::Error> for KvError {
    fn from(error: rusqlite::Error) -> KvError {
        if is_busy(&error) {
            KvError::Busy(error)
        } else {
            KvError::Database(error)
        }
    }
}

fn is_busy(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

const USAGE_GET: &str = "get <key>";
const USAGE_PUT: &str = "put <key> <value>";
const USAGE_DELETE: &str = "delete <key>";
const USAGE_SCAN: &str = "scan <limit> [<prefix>]";

/// Parse a request. Never panics; any input that is not exactly one of the four forms of
/// `docs/kv.md` is a [`RequestError`].
fn parse_request(bytes: &[u8]) -> Result<Request<'_>, RequestError> {
    if bytes.is_empty() {
        return Err(RequestError::EmptyRequest);
    }
    let (command, arguments) = match bytes.iter().position(|&byte| byte == b' ') {
        Some(space) => (&bytes[..space], Some(&bytes[space + 1..])),
        None => (bytes, None),
    };
    let usage = match command {
        b"get" => USAGE_GET,
        b"put" => USAGE_PUT,
        b"delete" => USAGE_DELETE,
        b"scan" => USAGE_SCAN,
        _ => return Err(RequestError::UnknownCommand(quote(command))),
    };
    let Some(arguments) = arguments else {
        return Err(RequestError::MissingArgument { usage });
    };
    let request = match command {
        b"get" | b"delete" => {
            if arguments.contains(&b' ') {
                return Err(RequestError::TooManyArguments { usage });
            }
            check_key("key", arguments)?;
            if command == b"get" {
                Request::Get { key: arguments }
            } else {
                Request::Delete { key: arguments }
            }
        }
        b"put" => {
            let Some(space) = arguments.iter().position(|&byte| byte == b' ') else {
                return Err(RequestError::MissingArgument { usage });
            };
            let (key, value) = (&arguments[..space], &arguments[space + 1..]);
            check_key("key", key)?;
            if value.len() > VALUE_BYTES_MAX {
                let len = value.len();
                return Err(RequestError::TooLong {
                    what: "value",
                    len,
                    max: VALUE_BYTES_MAX,
                });
            }
            Request::Put { key, value }
        }
        _ => {
            debug_assert_eq!(command, b"scan");
            let (limit, prefix) = match arguments.iter().position(|&byte| byte == b' ') {
                Some(space) => (&arguments[..space], &arguments[space + 1..]),
                None => (arguments, &arguments[arguments.len()..]),
            };
            let limit = parse_limit(limit)?;
            if prefix.contains(&b' ') {
                return Err(RequestError::TooManyArguments { usage });
            }
            // An empty prefix (`scan 10 `) means every key, like an omitted one.
            if !prefix.is_empty() {
                check_key("prefix", prefix)?;
            }
            Request::Scan { limit, prefix }
        }
    };
    Ok(request)
}

/// Check the key rules: 1 to [`KEY_BYTES_MAX`] bytes, no space, LF or NUL.
fn check_key(what: &'static str, key: &[u8]) -> Result<(), RequestError> {
    if key.is_empty() {
        return Err(RequestError::EmptyArgument { what });
    }
    if key.len() > KEY_BYTES_MAX {
        return Err(RequestError::TooLong {
            what,
            len: key.len(),
            max: KEY_BYTES_MAX,
        });
    }
    let forbidden = key.iter().enumerate().find_map(|(offset, &byte)| {
        let name = match byte {
            b' ' => "a space",
            b'\n' => "a LF",
            0 => "a NUL",
            _ => return None,
        };
        Some((offset, name))
    });
    if let Some((offset, byte)) = forbidden {
        return Err(RequestError::ForbiddenByte { what, byte, offset });
    }
    Ok(())
}

/// Parse a `scan` limit: ASCII digits only, value 1 to [`SCAN_LIMIT_MAX`].
fn parse_limit(bytes: &[u8]) -> Result<u32, RequestError> {
    let bad = || RequestError::BadLimit(quote(bytes));
    if bytes.is_empty() || !bytes.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    // All digits, so the only failure left is overflow, which is out of range anyway.
    let limit = std::str::from_utf8(bytes)
        .ok()
        .and_then(|digits| digits.parse::<u32>().ok())
        .ok_or_else(bad)?;
    if !(1..=SCAN_LIMIT_MAX).contains(&limit) {
        return Err(bad());
    }
    Ok(limit)
}

/// Caller bytes made printable (escaped) and short, for an error message.
fn quote(bytes: &[u8]) -> String {
    let shown = &bytes[..bytes.len().min(QUOTE_BYTES_MAX)];
    let mut text = shown.escape_ascii().to_string();
    if shown.len() < bytes.len() {
        text.push_str("...");
    }
    text
}

/// The smallest byte string greater than every string that starts with `prefix`, or `None` when
/// there is none (the prefix is empty or all 0xFF): then the scan has no upper bound.
fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let last = prefix.iter().rposition(|&byte| byte != 0xFF)?;
    let mut successor = prefix[..=last].to_vec();
    successor[last] += 1;
    debug_assert!(successor.as_slice() > prefix);
    debug_assert!(!successor.starts_with(prefix));
    Some(successor)
}

/// Append one scan entry: `<key> <value_len>\n<value>\n`.
fn push_entry(reply: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let before = reply.len();
    reply.extend_from_slice(key);
    reply.push(b' ');
    reply.extend_from_slice(value.len().to_string().as_bytes());
    reply.push(b'\n');
    reply.extend_from_slice(value);
    reply.push(b'\n');
    debug_assert_eq!(reply.len() - before, entry_bytes(key, value));
}

/// Length of one scan entry as [`push_entry`] writes it.
fn entry_bytes(key: &[u8], value: &[u8]) -> usize {
    let digits = value
        .len()
        .checked_ilog10()
        .map_or(1, |log| log as usize + 1);
    key.len() + 1 + digits + 1 + value.len() + 1
}

/// Why a worker cannot open its database; it exits with the message.
#[derive(Debug, thiserror::Error)]
enum OpenError {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error(
        "journal_mode is {0:?}, not WAL: put the database on a local filesystem that supports \
         shared memory (concurrent workers need WAL)"
    )]
    NotWal(String),
}

/// One worker's connection to the shared database.
struct Store {
    connection: Connection,
    /// Bound on a scan reply; the bridge refuses longer replies anyway.
    reply_bytes_max: usize,
}

impl Store {
    /// Open (creating if missing) the database and its table. Safe when several workers open the
    /// same new file at the same moment.
    fn open(
        path: &Path,
        busy_timeout: Duration,
        reply_bytes_max: usize,
    ) -> Result<Store, OpenError> {
        let connection = Connection::open(path)?;
        connection.busy_timeout(busy_timeout)?;
        // Switching to WAL takes an exclusive lock and may return BUSY without waiting while
        // another worker does the same or creates the schema; retry it.
        let mode = retry_busy(|| {
            connection
                .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get::<_, String>(0))
        })?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(OpenError::NotWal(mode));
        }
        connection.pragma_update(None, "synchronous", "NORMAL")?;
        retry_busy(|| connection.execute_batch(SQL_CREATE))?;
        // Prepare every statement now, so a malformed schema fails at startup, not per request.
        for sql in [
            SQL_GET,
            SQL_PUT,
            SQL_DELETE,
            SQL_SCAN_BOUNDED,
            SQL_SCAN_UNBOUNDED,
        ] {
            connection.prepare_cached(sql)?;
        }
        Ok(Store {
            connection,
            reply_bytes_max,
        })
    }

    fn execute(&self, request: &Request<'_>) -> Result<Vec<u8>, KvError> {
        match *request {
            Request::Get { key } => {
                let mut statement = self.connection.prepare_cached(SQL_GET)?;
                let value: Option<Vec<u8>> =
                    statement.query_row([key], |row| row.get(0)).optional()?;
                value.ok_or(KvError::NotFound)
            }
            Request::Put { key, value } => {
                let mut statement = self.connection.prepare_cached(SQL_PUT)?;
                let changed = statement.execute([key, value])?;
                debug_assert_eq!(changed, 1);
                Ok(b"OK".to_vec())
            }
            Request::Delete { key } => {
                let mut statement = self.connection.prepare_cached(SQL_DELETE)?;
                let deleted = statement.execute([key])?;
                debug_assert!(deleted <= 1, "key is the primary key");
                Ok(format!("deleted {deleted}").into_bytes())
            }
            Request::Scan { limit, prefix } => self.scan(limit, prefix),
        }
    }

    fn scan(&self, limit: u32, prefix: &[u8]) -> Result<Vec<u8>, KvError> {
        assert!((1..=SCAN_LIMIT_MAX).contains(&limit));
        let mut reply = Vec::new();
        let mut count: u32 = 0;
        let mut append = |key: &[u8], value: &[u8]| -> Result<(), KvError> {
            debug_assert!(key.starts_with(prefix));
            if reply.len() + entry_bytes(key, value) > self.reply_bytes_max {
                return Err(KvError::ReplyTooLarge(self.reply_bytes_max));
            }
            push_entry(&mut reply, key, value);
            count += 1;
            Ok(())
        };
        let limit = i64::from(limit);
        let successor = prefix_successor(prefix);
        let mut statement;
        let mut rows = match &successor {
            Some(successor) => {
                statement = self.connection.prepare_cached(SQL_SCAN_BOUNDED)?;
                statement.query(rusqlite::params![prefix, successor, limit])?
            }
            None => {
                statement = self.connection.prepare_cached(SQL_SCAN_UNBOUNDED)?;
                statement.query(rusqlite::params![prefix, limit])?
            }
        };
        while let Some(row) = rows.next()? {
            let key = row.get_ref(0)?.as_bytes().map_err(rusqlite::Error::from)?;
            let value = row.get_ref(1)?.as_bytes().map_err(rusqlite::Error::from)?;
            append(key, value)?;
        }
        debug_assert!(i64::from(count) <= limit);
        Ok(reply)
    }
}

/// Run a startup step, retrying while SQLite answers BUSY or LOCKED.
fn retry_busy<T>(mut step: impl FnMut() -> rusqlite::Result<T>) -> rusqlite::Result<T> {
    let mut attempt = 1;
    loop {
        match step() {
            Err(error) if is_busy(&error) && attempt < STARTUP_ATTEMPTS_MAX => {
                std::thread::sleep(Duration::from_millis(20 * u64::from(attempt)));
                attempt += 1;
            }
            result => return result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn open(dir: &tempfile::TempDir) -> Store {
        Store::open(&dir.path().join(DB_FILE_NAME), BUSY_TIMEOUT, 1 << 20).unwrap()
    }

    fn run(store: &Store, request: &[u8]) -> Result<Vec<u8>, String> {
        handle(store, request).map_err(|error| error.to_string())
    }

    fn ok(store: &Store, request: &[u8]) -> Vec<u8> {
        run(store, request).unwrap_or_else(|error| panic!("{}: {error}", quote(request)))
    }

    fn error(request: &[u8]) -> String {
        parse_request(request).unwrap_err().to_string()
    }

    #[test]
    fn parses_the_four_commands() {
        // The well-formed requests of docs/kv.md parse to what they say.
        assert_eq!(
            parse_request(b"get user:1"),
            Ok(Request::Get { key: b"user:1" })
        );
        assert_eq!(
            parse_request(b"put user:1 alice"),
            Ok(Request::Put {
                key: b"user:1",
                value: b"alice"
            })
        );
        assert_eq!(
            parse_request(b"delete k"),
            Ok(Request::Delete { key: b"k" })
        );
        assert_eq!(
            parse_request(b"scan 10"),
            Ok(Request::Scan {
                limit: 10,
                prefix: b""
            })
        );
        assert_eq!(
            parse_request(b"scan 10000 user:"),
            Ok(Request::Scan {
                limit: 10_000,
                prefix: b"user:"
            })
        );
        assert_eq!(
            parse_request(b"scan 1 "),
            Ok(Request::Scan {
                limit: 1,
                prefix: b""
            })
        );
        assert_eq!(
            parse_request(b"scan 007 a"),
            Ok(Request::Scan {
                limit: 7,
                prefix: b"a"
            })
        );
    }

    #[test]
    fn put_value_is_every_byte_after_the_key() {
        // The value may be empty and hold spaces, LF, NUL and any byte.
        assert_eq!(
            parse_request(b"put k "),
            Ok(Request::Put {
                key: b"k",
                value: b""
            })
        );
        assert_eq!(
            parse_request(b"put k  a b\n\0\xff "),
            Ok(Request::Put {
                key: b"k",
                value: b" a b\n\0\xff "
            })
        );
        let key: Vec<u8> = (1..=255u8).filter(|b| ![b' ', b'\n'].contains(b)).collect();
        let mut request = b"put ".to_vec();
        request.extend_from_slice(&key);
        request.extend_from_slice(b" v");
        assert_eq!(
            parse_request(&request),
            Ok(Request::Put {
                key: &key,
                value: b"v"
            })
        );
    }

    #[test]
    fn rejects_malformed_commands() {
        // Command words are exact, lower-case and followed by one space.
        assert_eq!(
            error(b"gte foo"),
            "unknown command \"gte\" (expected get, put, delete or scan)"
        );
        assert_eq!(
            error(b""),
            "empty request (expected get, put, delete or scan)"
        );
        assert!(error(b"GET k").starts_with("unknown command \"GET\""));
        assert!(error(b" get k").starts_with("unknown command \"\""));
        assert!(error(b"get\tk").starts_with("unknown command \"get\\tk\""));
        assert!(error(b"get\n").starts_with("unknown command \"get\\n\""));
        assert!(error(&[b'x'; 100]).ends_with("...\" (expected get, put, delete or scan)"));
        for (request, usage) in [
            (&b"get"[..], USAGE_GET),
            (b"put", USAGE_PUT),
            (b"put k", USAGE_PUT),
            (b"delete", USAGE_DELETE),
            (b"scan", USAGE_SCAN),
        ] {
            assert_eq!(
                parse_request(request),
                Err(RequestError::MissingArgument { usage })
            );
        }
        assert_eq!(
            error(b"get a b"),
            "too many arguments: expected `get <key>` (keys and prefixes contain no space)"
        );
        assert!(error(b"delete a ").starts_with("too many arguments"));
        assert!(error(b"scan 1 a b").starts_with("too many arguments"));
    }

    #[test]
    fn rejects_bad_keys() {
        // Keys are 1 to 1024 bytes with no space, LF or NUL, in every command.
        assert_eq!(error(b"get "), "key is empty");
        assert_eq!(error(b"put  v"), "key is empty");
        assert_eq!(
            error(b"get a\nb"),
            "key contains a LF at byte 1 (keys contain no space, LF or NUL)"
        );
        assert!(error(b"put a\0 v").starts_with("key contains a NUL at byte 1"));
        assert!(error(b"scan 5 p\n").starts_with("prefix contains a LF at byte 1"));
        let mut request = b"get ".to_vec();
        request.extend_from_slice(&[b'k'; KEY_BYTES_MAX]);
        assert!(parse_request(&request).is_ok());
        request.push(b'k');
        assert_eq!(
            error(&request),
            "key is 1025 bytes, over the maximum of 1024"
        );
        request[..4].copy_from_slice(b"scan");
        request.splice(4..4, b" 1 ".iter().copied());
        assert_eq!(
            error(&request),
            "prefix is 1025 bytes, over the maximum of 1024"
        );
    }

    #[test]
    fn rejects_bad_limits() {
        // A limit is ASCII digits with a value from 1 to 10000.
        for limit in [
            "0",
            "10001",
            "-1",
            "+5",
            "",
            "1.5",
            "ten",
            "99999999999999999999",
            "1e3",
        ] {
            let request = format!("scan {limit} p");
            assert_eq!(
                error(request.as_bytes()),
                format!("bad limit \"{limit}\": expected a decimal number from 1 to 10000")
            );
        }
        assert!(error(b"scan \xff").starts_with("bad limit \"\\xff\""));
    }

    #[test]
    fn rejects_oversized_value() {
        // A value over 16 MiB is refused before it reaches the database.
        let mut request = b"put k ".to_vec();
        request.resize(request.len() + VALUE_BYTES_MAX, b'v');
        assert!(parse_request(&request).is_ok());
        request.push(b'v');
        assert_eq!(
            error(&request),
            "value is 16777217 bytes, over the maximum of 16777216"
        );
    }

    #[test]
    fn prefix_successor_skips_trailing_ff() {
        // The successor is the least string above every extension of the prefix.
        assert_eq!(prefix_successor(b""), None);
        assert_eq!(prefix_successor(b"\xff\xff"), None);
        assert_eq!(prefix_successor(b"a"), Some(b"b".to_vec()));
        assert_eq!(prefix_successor(b"a\xff\xff"), Some(b"b".to_vec()));
        assert_eq!(
            prefix_successor(b"\x01\xfe\xff"),
            Some(b"\x01\xff".to_vec())
        );
    }

    #[test]
    fn scan_entry_format() {
        // Each entry is `<key> <value_len>\n<value>\n`, and entry_bytes predicts its length.
        let mut reply = Vec::new();
        for (key, value) in [
            (&b"a"[..], &b"x y\n"[..]),
            (b"b", b""),
            (b"c", &[7u8; 10][..]),
        ] {
            push_entry(&mut reply, key, value);
        }
        let mut expected = b"a 4\nx y\n\nb 0\n\nc 10\n".to_vec();
        expected.extend_from_slice(&[7u8; 10]);
        expected.push(b'\n');
        assert_eq!(reply, expected);
        for len in [0, 9, 10, 99, 100, 12345] {
            assert_eq!(
                entry_bytes(b"k", &vec![0; len]),
                3 + len.to_string().len() + len + 1
            );
        }
    }

    #[test]
    fn get_put_delete_round_trip() {
        // Values come back byte for byte; put overwrites; delete reports whether a key went.
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        assert_eq!(run(&store, b"get user:1"), Err("not found".to_string()));
        assert_eq!(ok(&store, b"put user:1 alice"), b"OK");
        assert_eq!(ok(&store, b"get user:1"), b"alice");
        assert_eq!(ok(&store, b"put user:1 bob smith\n"), b"OK");
        assert_eq!(ok(&store, b"get user:1"), b"bob smith\n");
        assert_eq!(ok(&store, b"put empty "), b"OK");
        assert_eq!(ok(&store, b"get empty"), b"");
        assert_eq!(ok(&store, b"put \xff\x80\x01 \0\xff\0"), b"OK");
        assert_eq!(ok(&store, b"get \xff\x80\x01"), b"\0\xff\0");
        assert_eq!(ok(&store, b"delete user:1"), b"deleted 1");
        assert_eq!(ok(&store, b"delete user:1"), b"deleted 0");
        assert_eq!(run(&store, b"get user:1"), Err("not found".to_string()));
        assert_eq!(
            run(&store, b"gte x"),
            Err(format!("bad request: {}", error(b"gte x")))
        );
        drop(store);
        // The data outlives the connection: a new worker sees it.
        let store = open(&dir);
        assert_eq!(ok(&store, b"get empty"), b"");
    }

    #[test]
    fn docs_examples_hold() {
        // The examples in docs/kv.md give the replies and messages it shows.
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        assert_eq!(ok(&store, b"put user:1 alice"), b"OK");
        assert_eq!(ok(&store, b"put user:2 bob smith"), b"OK");
        assert_eq!(ok(&store, b"put user:3 "), b"OK");
        assert_eq!(ok(&store, b"get user:2"), b"bob smith");
        assert_eq!(run(&store, b"get user:9"), Err("not found".to_string()));
        assert_eq!(
            ok(&store, b"scan 2 user:"),
            b"user:1 5\nalice\nuser:2 9\nbob smith\n"
        );
        assert_eq!(ok(&store, b"delete user:1"), b"deleted 1");
        assert_eq!(ok(&store, b"put k\xff\x01 line 1\nline 2"), b"OK");
        assert_eq!(ok(&store, b"get k\xff\x01"), b"line 1\nline 2");
        for (request, message) in [
            (
                &b"gte x"[..],
                "unknown command \"gte\" (expected get, put, delete or scan)",
            ),
            (b"put k", "missing argument: expected `put <key> <value>`"),
            (
                b"get user:1\n",
                "key contains a LF at byte 6 (keys contain no space, LF or NUL)",
            ),
            (
                b"scan 0",
                "bad limit \"0\": expected a decimal number from 1 to 10000",
            ),
        ] {
            assert_eq!(run(&store, request), Err(format!("bad request: {message}")));
        }
    }

    #[test]
    fn scan_orders_by_bytes_and_matches_binary_prefixes() {
        // Prefixes match bytes exactly (0xFF, %, _ included), in ascending byte order, up to limit.
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let keys: [&[u8]; 10] = [
            b"a",
            b"ab",
            b"a%",
            b"a_",
            b"b",
            b"\x7f",
            b"\x80",
            b"\xff",
            b"\xff\xff\x01",
            b"a\xff",
        ];
        for key in keys {
            let mut request = b"put ".to_vec();
            request.extend_from_slice(key);
            request.extend_from_slice(b" v");
            ok(&store, &request);
        }
        let scan_keys = |request: &[u8]| -> Vec<Vec<u8>> {
            let reply = ok(&store, request);
            let mut keys = Vec::new();
            let mut rest = &reply[..];
            while !rest.is_empty() {
                let line_end = rest.iter().position(|&b| b == b'\n').unwrap();
                let line = &rest[..line_end];
                let space = line.iter().rposition(|&b| b == b' ').unwrap();
                let len: usize = std::str::from_utf8(&line[space + 1..])
                    .unwrap()
                    .parse()
                    .unwrap();
                assert_eq!(&rest[line_end + 1..line_end + 1 + len], b"v");
                assert_eq!(rest[line_end + 1 + len], b'\n');
                keys.push(line[..space].to_vec());
                rest = &rest[line_end + 2 + len..];
            }
            keys
        };
        let all: Vec<&[u8]> = vec![
            b"a",
            b"a%",
            b"a_",
            b"ab",
            b"a\xff",
            b"b",
            b"\x7f",
            b"\x80",
            b"\xff",
            b"\xff\xff\x01",
        ];
        assert_eq!(scan_keys(b"scan 100"), all);
        assert_eq!(scan_keys(b"scan 3"), all[..3]);
        assert_eq!(scan_keys(b"scan 100 a"), all[..5]);
        assert_eq!(scan_keys(b"scan 100 a%"), vec![b"a%"]);
        assert_eq!(scan_keys(b"scan 100 a_"), vec![b"a_"]);
        assert_eq!(scan_keys(b"scan 100 a\xff"), vec![b"a\xff"]);
        assert_eq!(
            scan_keys(b"scan 100 \xff"),
            vec![&b"\xff"[..], b"\xff\xff\x01"]
        );
        assert_eq!(scan_keys(b"scan 100 \xff\xff"), vec![b"\xff\xff\x01"]);
        assert_eq!(ok(&store, b"scan 100 zzz"), b"");
        assert_eq!(ok(&store, b"scan 1 b"), b"b 1\nv\n");
    }

    #[test]
    fn scan_reply_over_the_bound_is_an_error() {
        // A scan whose reply would pass the payload bound fails instead of growing without bound.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join(DB_FILE_NAME), BUSY_TIMEOUT, 20).unwrap();
        ok(&store, b"put a 0123456789");
        assert_eq!(ok(&store, b"scan 10"), b"a 10\n0123456789\n");
        ok(&store, b"put b x");
        let message = run(&store, b"scan 10").unwrap_err();
        assert!(
            message.starts_with("scan reply would be over the maximum of 20 bytes"),
            "{message}"
        );
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        // Random and mutated requests get a reply or an error, never a panic (seeded, replayable).
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x6B_AC);
        let seeds: [&[u8]; 6] = [
            b"get k",
            b"put k v",
            b"delete k",
            b"scan 10 k",
            b"scan 1",
            b"put \xff \xff",
        ];
        for _ in 0..5000 {
            let mut request = seeds[rng.gen_range(0..seeds.len())].to_vec();
            for _ in 0..rng.gen_range(0..4) {
                let at = rng.gen_range(0..=request.len());
                match rng.gen_range(0..3) {
                    0 => request.insert(at, rng.gen()),
                    1 if at < request.len() => {
                        request.remove(at);
                    }
                    _ => request.insert(at, [b' ', b'\n', 0, 0xFF][rng.gen_range(0..4)]),
                }
            }
            let _ = handle(&store, &request);
        }
        for _ in 0..1000 {
            let len = rng.gen_range(0..16);
            let request: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            let _ = handle(&store, &request);
        }
    }

    #[test]
    fn concurrent_writers_lose_no_puts() {
        // Two workers' connections interleaving upserts on one file keep every write.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE_NAME);
        let threads: Vec<_> = (0..2)
            .map(|worker| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let store = Store::open(&path, BUSY_TIMEOUT, 1 << 20).unwrap();
                    for i in 0..500 {
                        let request = format!("put w{worker}:{i:04} {i}");
                        assert_eq!(handle(&store, request.as_bytes()).unwrap(), b"OK");
                        let shared = format!("put shared {worker}");
                        assert_eq!(handle(&store, shared.as_bytes()).unwrap(), b"OK");
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let store = open(&dir);
        let count: i64 = store
            .connection
            .query_row("SELECT count(*) FROM kv", [], |row| row.get(0))
            .unwrap();
        assert_eq!(count, 1001);
        for worker in 0..2 {
            let reply = ok(&store, format!("scan 10000 w{worker}:").as_bytes());
            assert_eq!(reply.iter().filter(|&&b| b == b'\n').count(), 1000);
            assert_eq!(ok(&store, format!("get w{worker}:0499").as_bytes()), b"499");
        }
    }

    #[test]
    fn workers_starting_together_create_the_schema_once() {
        // Eight workers opening a new database file at the same moment all succeed.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE_NAME);
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|worker| {
                let (path, barrier) = (path.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let store = Store::open(&path, BUSY_TIMEOUT, 1 << 20).unwrap();
                    let request = format!("put k{worker} v");
                    assert_eq!(handle(&store, request.as_bytes()).unwrap(), b"OK");
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let reply = ok(&open(&dir), b"scan 100 k");
        assert_eq!(reply.iter().filter(|&&b| b == b'\n').count(), 16);
    }

    #[test]
    fn busy_past_the_timeout_is_an_error_reply() {
        // A write lock held longer than the busy timeout gives a "busy, retry" error, not a panic.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE_NAME);
        let store = Store::open(&path, Duration::from_millis(50), 1 << 20).unwrap();
        let holder = Connection::open(&path).unwrap();
        holder
            .execute_batch("BEGIN IMMEDIATE; INSERT INTO kv VALUES (x'00', x'00');")
            .unwrap();
        let error = handle(&store, b"put k v").unwrap_err();
        assert!(matches!(error, KvError::Busy(_)), "{error}");
        assert!(error.to_string().starts_with("database busy"), "{error}");
        holder.execute_batch("ROLLBACK").unwrap();
        assert_eq!(handle(&store, b"put k v").unwrap(), b"OK");
    }

    #[test]
    fn database_path_prefers_kv_db_path() {
        // KV_DB_PATH wins, then ACGI_STATE_DIR/kv.sqlite3; empty is unset; neither is an error.
        let some = |text: &str| Some(OsString::from(text));
        assert_eq!(
            database_path(some("/x/db"), some("/state")),
            Ok(PathBuf::from("/x/db"))
        );
        assert_eq!(
            database_path(None, some("/state")),
            Ok(PathBuf::from("/state/kv.sqlite3"))
        );
        assert_eq!(
            database_path(some(""), some("/state")),
            Ok(PathBuf::from("/state/kv.sqlite3"))
        );
        let message = database_path(None, some("")).unwrap_err();
        assert!(
            message.contains(ENV_DB_PATH) && message.contains(ENV_STATE_DIR),
            "{message}"
        );
    }
}
