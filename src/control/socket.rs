//! The control socket: `state.dir/sluice.sock`, served by the daemon, asked by `sluice status`
//! and `sluice lag`. The wire format is described in `proto/control.md`.
//!
//! Why it is shaped this way:
//! - **Owner-only.** The state dir is 0700 and the socket 0600, so only the user running the
//!   daemon (and root) can talk to it. Status holds nothing secret today, but the socket is
//!   the place later control requests (pause, skip after an operator decision) will arrive.
//! - **Bounded frames.** Every frame is a 4-byte big-endian length and a MessagePack body of at
//!   most [`MAX_FRAME`] bytes. A larger length is answered with an error and the connection is
//!   closed before anything is allocated, so garbage cannot make the daemon allocate gigabytes.
//! - **Never a crash.** A request that does not decode gets an `error` answer naming what was
//!   wrong; the connection stays usable. Each connection is its own task with an idle timeout,
//!   so a client that connects and says nothing costs one parked task for a while, no more.
//! - **Self-describing maps.** Requests and answers are MessagePack maps with string keys
//!   (`{"request": "status"}`), so a client in any language can talk to it and fields can be
//!   added without breaking older clients.

use std::io::ErrorKind as IoKind;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

use crate::control::status::{SharedStatus, StatusReport};
use crate::error::{Error, ErrorKind, Result};

/// The socket's file name inside the state dir.
pub const SOCKET_NAME: &str = "sluice.sock";

/// The largest frame body either side accepts (1 MiB): a status report with thousands of
/// tables fits many times over.
pub const MAX_FRAME: usize = 1 << 20;

/// How long a connection may stay silent before the daemon closes it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the daemon waits for the rest of a frame once its length arrived.
const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// The socket path for a state dir.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

/// What a client may ask.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Request {
    /// The daemon's current [`StatusReport`].
    Status,
}

/// What the daemon answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Response {
    Status { status: Box<StatusReport> },
    Error { message: String },
}

/// Why a frame could not be read.
#[derive(Debug)]
pub enum FrameError {
    /// The peer closed the connection cleanly between frames.
    Closed,
    /// The length prefix announced more than [`MAX_FRAME`] bytes.
    TooLarge(u64),
    Io(std::io::Error),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Closed => f.write_str("the connection was closed"),
            FrameError::TooLarge(len) => write!(
                f,
                "a frame of {len} bytes was announced; the limit is {MAX_FRAME} bytes"
            ),
            FrameError::Io(error) => write!(f, "{error}"),
        }
    }
}

impl std::error::Error for FrameError {}

/// Reads one frame body. The length is checked before the body buffer is allocated.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Vec<u8>, FrameError> {
    let mut prefix = [0u8; 4];
    match reader.read_exact(&mut prefix).await {
        Ok(_) => {}
        Err(error) if error.kind() == IoKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(error) => return Err(FrameError::Io(error)),
    }
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len as u64));
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).await.map_err(FrameError::Io)?;
    Ok(body)
}

/// Writes one frame (length prefix and body) and flushes it.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    body: &[u8],
) -> Result<(), FrameError> {
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len() as u64));
    }
    let prefix = (body.len() as u32).to_be_bytes();
    writer.write_all(&prefix).await.map_err(FrameError::Io)?;
    writer.write_all(body).await.map_err(FrameError::Io)?;
    writer.flush().await.map_err(FrameError::Io)
}

/// MessagePack with field names (maps), the form `proto/control.md` describes.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    rmp_serde::to_vec_named(value).map_err(|e| {
        Error::with_source(ErrorKind::Definite, "Encoding a control-socket message", e)
    })
}

/// The running socket server. Dropping it (or calling [`ServeHandle::shutdown`]) stops
/// accepting and removes the socket file.
#[derive(Debug)]
pub struct ServeHandle {
    path: PathBuf,
    task: Option<JoinHandle<()>>,
}

impl ServeHandle {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops the server and removes the socket file.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for ServeHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Serves the control socket `state_dir/sluice.sock` until the handle is dropped.
///
/// Must be called inside a tokio runtime. Creates the state dir (0700) when missing, removes a
/// stale socket file left by a daemon that died, and refuses to start when another daemon
/// answers on the socket.
pub fn serve(state_dir: &Path, status: SharedStatus) -> Result<ServeHandle> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(Error::definite(
            "The control socket must be served from inside the async runtime",
        ));
    }
    std::fs::create_dir_all(state_dir).map_err(|e| {
        Error::with_source(
            ErrorKind::Config,
            format!("Cannot create state.dir {}", state_dir.display()),
            e,
        )
    })?;
    std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| {
        Error::with_source(
            ErrorKind::Definite,
            format!(
                "Cannot make state.dir {} owner-only (0700)",
                state_dir.display()
            ),
            e,
        )
    })?;
    let path = socket_path(state_dir);
    remove_stale_socket(&path)?;

    let listener = std::os::unix::net::UnixListener::bind(&path).map_err(|e| {
        Error::with_source(
            ErrorKind::Definite,
            format!("Cannot create the control socket {}", path.display()),
            e,
        )
    })?;
    // The dir is already 0700, so nobody else could reach the socket between bind and chmod.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(|e| {
        let _ = std::fs::remove_file(&path);
        Error::with_source(
            ErrorKind::Definite,
            format!(
                "Cannot make the control socket {} owner-only",
                path.display()
            ),
            e,
        )
    })?;
    let listener = listener
        .set_nonblocking(true)
        .and_then(|_| UnixListener::from_std(listener))
        .map_err(|e| {
            let _ = std::fs::remove_file(&path);
            Error::with_source(
                ErrorKind::Definite,
                format!("Cannot listen on the control socket {}", path.display()),
                e,
            )
        })?;
    tracing::debug!(socket = %path.display(), "control socket listening");
    let task = tokio::spawn(accept_loop(listener, status));
    Ok(ServeHandle {
        path,
        task: Some(task),
    })
}

/// A socket file nobody listens on is left over from a daemon that died: remove it. One that
/// accepts a connection belongs to a live daemon: refuse to start a second one on this
/// state dir.
fn remove_stale_socket(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(error) if error.kind() == IoKind::NotFound => return Ok(()),
        Err(error) => {
            return Err(Error::with_source(
                ErrorKind::Definite,
                format!("Cannot inspect {}", path.display()),
                error,
            ))
        }
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(Error::definite(format!(
                    "{} exists and is not a socket: move it away; sluice keeps its control socket there",
                    path.display()
                )));
            }
        }
    }
    // Connecting to a Unix socket either succeeds at once (someone listens) or is refused at
    // once: no blocking to speak of.
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(Error::definite(format!(
            "Another sluice daemon is answering on {}: stop it first, or give this one another state.dir",
            path.display()
        ))),
        Err(error) if error.kind() == IoKind::ConnectionRefused => {
            std::fs::remove_file(path).map_err(|e| {
                Error::with_source(
                    ErrorKind::Definite,
                    format!("Cannot remove the stale control socket {}", path.display()),
                    e,
                )
            })?;
            tracing::info!(socket = %path.display(), "removed a stale control socket");
            Ok(())
        }
        Err(error) => Err(Error::with_source(
            ErrorKind::Definite,
            format!(
                "Cannot check whether a daemon listens on {}",
                path.display()
            ),
            error,
        )),
    }
}

async fn accept_loop(listener: UnixListener, status: SharedStatus) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(handle_connection(stream, status.clone()));
            }
            Err(error) => {
                // EMFILE and friends: wait a little instead of spinning.
                tracing::warn!(%error, "control socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle_connection(mut stream: UnixStream, status: SharedStatus) {
    loop {
        // Wait for the length prefix with the idle timeout, then for the body with the
        // shorter frame timeout.
        let mut prefix = [0u8; 4];
        match tokio::time::timeout(IDLE_TIMEOUT, stream.read_exact(&mut prefix)).await {
            Err(_) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
        }
        let len = u32::from_be_bytes(prefix) as usize;
        if len > MAX_FRAME {
            let answer = Response::Error {
                message: format!(
                    "Frame of {len} bytes refused: the limit is {MAX_FRAME} bytes. Each frame is a 4-byte big-endian length and a MessagePack body (see proto/control.md)"
                ),
            };
            // The rest of the stream cannot be framed any more: answer and close.
            let _ = send(&mut stream, &answer).await;
            return;
        }
        let mut body = vec![0u8; len];
        match tokio::time::timeout(FRAME_TIMEOUT, stream.read_exact(&mut body)).await {
            Err(_) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
        }
        let answer = answer(&body, &status);
        if send(&mut stream, &answer).await.is_err() {
            return;
        }
    }
}

/// The answer to one request body.
pub fn answer(body: &[u8], status: &SharedStatus) -> Response {
    match rmp_serde::from_slice::<Request>(body) {
        Ok(Request::Status) => Response::Status {
            status: Box::new(status.snapshot()),
        },
        Err(error) => Response::Error {
            message: format!(
                "Cannot decode the request ({error}): send a MessagePack map like {{\"request\": \"status\"}} (see proto/control.md)"
            ),
        },
    }
}

async fn send(stream: &mut UnixStream, response: &Response) -> Result<(), FrameError> {
    let body = match encode(response) {
        Ok(body) => body,
        Err(error) => encode(&Response::Error {
            message: error.report(),
        })
        .unwrap_or_default(),
    };
    write_frame(stream, &body).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_maps_with_a_request_key() {
        let bytes = encode(&Request::Status).unwrap();
        let value: serde_json::Value = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(value, serde_json::json!({"request": "status"}));
        // The bytes proto/control.md shows.
        assert_eq!(bytes, b"\x81\xa7request\xa6status");
        // Extra keys from newer clients are ignored.
        let newer =
            rmp_serde::to_vec_named(&serde_json::json!({"request": "status", "verbose": true}))
                .unwrap();
        assert_eq!(
            rmp_serde::from_slice::<Request>(&newer).unwrap(),
            Request::Status
        );
    }

    #[test]
    fn answers_round_trip() {
        let status = SharedStatus::new("sluice");
        status.update(|s| s.applied_lsn = Some(crate::Lsn(0x16_B374_D848)));
        let answer = answer(&encode(&Request::Status).unwrap(), &status);
        let bytes = encode(&answer).unwrap();
        let back: Response = rmp_serde::from_slice(&bytes).unwrap();
        match back {
            Response::Status { status } => {
                assert_eq!(status.applied_lsn, Some(crate::Lsn(0x16_B374_D848)));
                assert_eq!(status.slot, "sluice");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn garbage_gets_an_error_answer() {
        let status = SharedStatus::new("sluice");
        for garbage in [
            &b""[..],
            b"\xc1",
            b"\xff\xff\xff",
            b"\x81\xa7request\xa4stop",
            b"\xdf\xff\xff\xff\xff",
        ] {
            match answer(garbage, &status) {
                Response::Error { message } => assert!(message.contains("request"), "{message}"),
                other => panic!("{garbage:?} answered {other:?}"),
            }
        }
    }
}
