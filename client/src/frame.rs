//! Encoding client frames and classifying server frames (no I/O).

use parley_proto::v1::{client_frame, event, reply, server_frame, ClientFrame, ServerFrame};
use prost::Message as _;

/// A decoded server frame, in the shape the connection code acts on.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Incoming {
    /// The successful answer to request `request_id`.
    Reply {
        /// The id of the answered request.
        request_id: u64,
        /// The result; `None` if the server sent a reply without one.
        result: Option<reply::Result>,
    },
    /// The failed answer to request `request_id` (0: not tied to a request).
    Error(parley_proto::v1::Error),
    /// A pushed event.
    Event(event::Kind),
    /// A well-formed frame with nothing in it (an empty event or body); ignored.
    Empty,
}

/// Encodes one client frame as the payload of a binary WebSocket message.
pub(crate) fn encode_request(request_id: u64, body: client_frame::Body) -> Vec<u8> {
    ClientFrame {
        request_id,
        body: Some(body),
    }
    .encode_to_vec()
}

/// Decodes the payload of a binary WebSocket message from the server.
pub(crate) fn decode_server(bytes: &[u8]) -> Result<Incoming, prost::DecodeError> {
    let frame = ServerFrame::decode(bytes)?;
    Ok(match frame.body {
        Some(server_frame::Body::Reply(r)) => Incoming::Reply {
            request_id: r.request_id,
            result: r.result,
        },
        Some(server_frame::Body::Error(e)) => Incoming::Error(e),
        Some(server_frame::Body::Event(parley_proto::v1::Event { kind: Some(kind) })) => {
            Incoming::Event(kind)
        }
        Some(server_frame::Body::Event(_)) | None => Incoming::Empty,
    })
}

/// The protocol name of a request, for errors and logs.
pub(crate) fn request_name(body: &client_frame::Body) -> &'static str {
    match body {
        client_frame::Body::Register(_) => "Register",
        client_frame::Body::Login(_) => "Login",
        client_frame::Body::Authenticate(_) => "Authenticate",
        client_frame::Body::Send(_) => "Send",
        client_frame::Body::Ack(_) => "Ack",
        client_frame::Body::MarkRead(_) => "MarkRead",
        client_frame::Body::Sync(_) => "Sync",
        client_frame::Body::Fetch(_) => "Fetch",
        client_frame::Body::SetPrivacy(_) => "SetPrivacy",
        client_frame::Body::Ping(_) => "Ping",
    }
}

/// A short description of a reply result, for "unexpected reply" errors.
pub(crate) fn result_name(result: &Option<reply::Result>) -> String {
    let name = match result {
        None => "an empty reply",
        Some(reply::Result::Registered(_)) => "Registered",
        Some(reply::Result::LoggedIn(_)) => "LoggedIn",
        Some(reply::Result::Authenticated(_)) => "Authenticated",
        Some(reply::Result::Sent(_)) => "Sent",
        Some(reply::Result::CursorSet(_)) => "CursorSet",
        Some(reply::Result::SyncComplete(_)) => "SyncComplete",
        Some(reply::Result::History(_)) => "History",
        Some(reply::Result::PrivacySet(_)) => "PrivacySet",
        Some(reply::Result::Pong(_)) => "Pong",
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use parley_proto::v1::{
        Error, ErrorCode, Event, Message, Receipt, Reply, Send, Sent, ServerFrame,
    };

    fn encode_server(body: server_frame::Body) -> Vec<u8> {
        ServerFrame { body: Some(body) }.encode_to_vec()
    }

    #[test]
    fn client_frames_round_trip() {
        let body = client_frame::Body::Send(Send {
            client_msg_id: "abc".into(),
            recipient: "bob".into(),
            body: b"hi".to_vec(),
        });
        let bytes = encode_request(42, body.clone());
        let frame = ClientFrame::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(frame.request_id, 42);
        assert_eq!(frame.body, Some(body));
    }

    #[test]
    fn replies_errors_and_events_are_classified() {
        let sent = reply::Result::Sent(Sent {
            conversation_id: "dm:alice:bob".into(),
            seq: 3,
            server_time_ms: 1,
            duplicate: false,
        });
        let bytes = encode_server(server_frame::Body::Reply(Reply {
            request_id: 9,
            result: Some(sent.clone()),
        }));
        assert_eq!(
            decode_server(&bytes).expect("decodes"),
            Incoming::Reply {
                request_id: 9,
                result: Some(sent)
            }
        );

        let error = Error {
            request_id: 4,
            code: ErrorCode::NotMember as i32,
            message: "no".into(),
            retry_after_ms: 0,
        };
        let bytes = encode_server(server_frame::Body::Error(error.clone()));
        assert_eq!(
            decode_server(&bytes).expect("decodes"),
            Incoming::Error(error)
        );

        for kind in [
            event::Kind::Message(Message {
                conversation_id: "dm:a:b".into(),
                seq: 1,
                sender: "a".into(),
                client_msg_id: "x".into(),
                server_time_ms: 5,
                body: vec![0, 1, 2],
            }),
            event::Kind::Receipt(Receipt {
                conversation_id: "dm:a:b".into(),
                user_id: "b".into(),
                delivered_seq: 1,
                read_seq: 0,
            }),
        ] {
            let bytes = encode_server(server_frame::Body::Event(Event {
                kind: Some(kind.clone()),
            }));
            assert_eq!(
                decode_server(&bytes).expect("decodes"),
                Incoming::Event(kind)
            );
        }
    }

    #[test]
    fn empty_frames_and_garbage() {
        let empty = ServerFrame { body: None }.encode_to_vec();
        assert_eq!(decode_server(&empty).expect("decodes"), Incoming::Empty);
        let empty_event = encode_server(server_frame::Body::Event(Event { kind: None }));
        assert_eq!(
            decode_server(&empty_event).expect("decodes"),
            Incoming::Empty
        );
        assert!(decode_server(&[0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn names() {
        assert_eq!(
            request_name(&client_frame::Body::Sync(Default::default())),
            "Sync"
        );
        assert_eq!(result_name(&None), "an empty reply");
        assert_eq!(
            result_name(&Some(reply::Result::Pong(Default::default()))),
            "Pong"
        );
    }
}
