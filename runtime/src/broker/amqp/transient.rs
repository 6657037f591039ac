//! Which RabbitMQ failures are worth retrying. lapin reports every failure as one
//! [`lapin::Error`]; wasmq needs one answer from it — may the same operation succeed later,
//! on a fresh channel or connection? — to decide between reconnecting and giving up.
//!
//! lapin's [`lapin::Error::can_be_recovered`] answers it for everything but the broker's own
//! refusals, which it calls all recoverable. Those are split by their AMQP code: a soft
//! (channel) error is transient unless repeating the operation must fail the same way —
//! 406 PRECONDITION_FAILED (a queue declared with other arguments), 403 ACCESS_REFUSED,
//! 311 CONTENT_TOO_LARGE; a hard (connection) error is transient only when the broker closed
//! the connection for reasons of its own (320 CONNECTION_FORCED at a restart, 504
//! CHANNEL_ERROR, 506 RESOURCE_ERROR, 541 INTERNAL_ERROR), not when it found the client at
//! fault (frame or syntax errors, 530 NOT_ALLOWED for a vhost the user may not use).

use lapin::ErrorKind;
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};

/// True when retrying the failed operation later (after reconnecting) may succeed: the
/// connection or channel was lost, a heartbeat was missed, or the broker refused for a
/// reason that can pass.
pub(crate) fn is_transient(error: &lapin::Error) -> bool {
    match error.kind() {
        ErrorKind::ProtocolError(refusal) => match refusal.kind() {
            AMQPErrorKind::Soft(soft) => !matches!(
                soft,
                AMQPSoftError::PRECONDITIONFAILED
                    | AMQPSoftError::ACCESSREFUSED
                    | AMQPSoftError::CONTENTTOOLARGE
            ),
            AMQPErrorKind::Hard(hard) => matches!(
                hard,
                AMQPHardError::CONNECTIONFORCED
                    | AMQPHardError::CHANNELERROR
                    | AMQPHardError::RESOURCEERROR
                    | AMQPHardError::INTERNALERROR
            ),
        },
        _ => error.can_be_recovered(),
    }
}

#[cfg(test)]
mod tests {
    use lapin::protocol::AMQPError;

    use super::*;

    fn refusal(kind: AMQPErrorKind) -> lapin::Error {
        ErrorKind::ProtocolError(AMQPError::new(kind, "refused".into())).into()
    }

    #[test]
    fn lost_connections_and_passing_refusals_are_transient() {
        for kind in [
            std::io::ErrorKind::ConnectionReset,
            std::io::ErrorKind::ConnectionRefused,
            std::io::ErrorKind::BrokenPipe,
            std::io::ErrorKind::TimedOut,
        ] {
            assert!(is_transient(&std::io::Error::from(kind).into()), "{kind:?}");
        }
        assert!(is_transient(&ErrorKind::MissingHeartbeatError.into()));
        assert!(is_transient(&ErrorKind::InvalidChannel(7).into()));
        for soft in [
            AMQPSoftError::NOTFOUND,
            AMQPSoftError::RESOURCELOCKED,
            AMQPSoftError::NOROUTE,
        ] {
            assert!(
                is_transient(&refusal(AMQPErrorKind::Soft(soft.clone()))),
                "{soft}"
            );
        }
        for hard in [
            AMQPHardError::CONNECTIONFORCED,
            AMQPHardError::CHANNELERROR,
            AMQPHardError::RESOURCEERROR,
            AMQPHardError::INTERNALERROR,
        ] {
            assert!(
                is_transient(&refusal(AMQPErrorKind::Hard(hard.clone()))),
                "{hard}"
            );
        }
    }

    #[test]
    fn refusals_that_would_repeat_are_permanent() {
        for soft in [
            AMQPSoftError::PRECONDITIONFAILED,
            AMQPSoftError::ACCESSREFUSED,
            AMQPSoftError::CONTENTTOOLARGE,
        ] {
            assert!(
                !is_transient(&refusal(AMQPErrorKind::Soft(soft.clone()))),
                "{soft}"
            );
        }
        for hard in [
            AMQPHardError::NOTALLOWED,
            AMQPHardError::FRAMEERROR,
            AMQPHardError::SYNTAXERROR,
            AMQPHardError::NOTIMPLEMENTED,
        ] {
            assert!(
                !is_transient(&refusal(AMQPErrorKind::Hard(hard.clone()))),
                "{hard}"
            );
        }
        assert!(!is_transient(&ErrorKind::ChannelsLimitReached.into()));
        assert!(!is_transient(
            &ErrorKind::AuthProviderError("no".into()).into()
        ));
    }
}
