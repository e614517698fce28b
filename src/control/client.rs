//! The client side of the control socket, used by `sluice status` and `sluice lag`.

use std::io::ErrorKind as IoKind;
use std::path::Path;
use std::time::Duration;

use tokio::net::UnixStream;

use crate::control::socket::{self, Request, Response};
use crate::control::status::StatusReport;
use crate::error::{Error, ErrorKind, Result};

/// How long a request may take, connect to answer. The daemon answers from memory, so a
/// slow answer means a wedged daemon, which the caller should hear about.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends one request. `Ok(None)` when no daemon listens on the state dir (no socket file, or
/// a stale one nobody accepts on); an error when a daemon is there but cannot be asked
/// (permission denied, no answer in time, a broken answer).
pub async fn request(state_dir: &Path, request: &Request) -> Result<Option<Response>> {
    let path = socket::socket_path(state_dir);
    let exchange = async {
        let mut stream = match UnixStream::connect(&path).await {
            Ok(stream) => stream,
            Err(error)
                if matches!(
                    error.kind(),
                    IoKind::NotFound | IoKind::ConnectionRefused
                ) =>
            {
                return Ok(None)
            }
            Err(error) if error.kind() == IoKind::PermissionDenied => {
                return Err(Error::with_source(
                    ErrorKind::Definite,
                    format!(
                        "Permission denied on the control socket {}: it is owner-only; run this command as the user that runs `sluice run`",
                        path.display()
                    ),
                    error,
                ))
            }
            Err(error) => {
                return Err(Error::with_source(
                    ErrorKind::Transient,
                    format!("Cannot connect to the control socket {}", path.display()),
                    error,
                ))
            }
        };
        let body = socket::encode(request)?;
        let broken = |error: socket::FrameError| {
            Error::with_source(
                ErrorKind::Transient,
                format!(
                    "The daemon on {} did not answer properly: is it shutting down? Try again",
                    path.display()
                ),
                error,
            )
        };
        socket::write_frame(&mut stream, &body)
            .await
            .map_err(broken)?;
        let answer = socket::read_frame(&mut stream).await.map_err(broken)?;
        rmp_serde::from_slice::<Response>(&answer)
            .map(Some)
            .map_err(|e| {
                Error::with_source(
                    ErrorKind::Definite,
                    format!(
                        "Cannot decode the daemon's answer on {}: is it another sluice version?",
                        path.display()
                    ),
                    e,
                )
            })
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
        Ok(result) => result,
        Err(_) => Err(Error::transient(format!(
            "The daemon on {} did not answer within {REQUEST_TIMEOUT:?}: it may be overloaded or wedged",
            path.display()
        ))),
    }
}

/// The running daemon's status, `None` when no daemon listens on the state dir.
pub async fn request_status(state_dir: &Path) -> Result<Option<StatusReport>> {
    match request(state_dir, &Request::Status).await? {
        None => Ok(None),
        Some(Response::Status { status }) => Ok(Some(*status)),
        Some(Response::Error { message }) => Err(Error::definite(format!(
            "The daemon refused the status request: {message}"
        ))),
    }
}
