//! Conversation ids and text limits.

use crate::error::ClientError;

/// Most characters (Unicode scalar values) a text message may have; 65,536 characters
/// of UTF-8 fit the server's default 256 KiB payload limit.
pub const MAX_TEXT_CHARS: usize = 65_536;

/// The id of the 1:1 conversation of users `a` and `b`: `dm:<first>:<second>` with the
/// two ids in byte order, the same for both members.
pub fn dm_conversation_id(a: &str, b: &str) -> String {
    let (first, second) = if a.as_bytes() <= b.as_bytes() {
        (a, b)
    } else {
        (b, a)
    };
    format!("dm:{first}:{second}")
}

/// Refuses a text with more than [`MAX_TEXT_CHARS`] characters.
pub fn check_text(text: &str) -> Result<(), ClientError> {
    let chars = text.chars().count();
    if chars > MAX_TEXT_CHARS {
        return Err(ClientError::TextTooLong {
            chars,
            limit: MAX_TEXT_CHARS,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dm_ids_are_symmetric_and_byte_ordered() {
        assert_eq!(dm_conversation_id("alice", "bob"), "dm:alice:bob");
        assert_eq!(dm_conversation_id("bob", "alice"), "dm:alice:bob");
        assert_eq!(dm_conversation_id("a.b", "a_b"), "dm:a.b:a_b");
        assert_eq!(dm_conversation_id("a1", "a"), "dm:a:a1");
        assert_eq!(dm_conversation_id("x", "x"), "dm:x:x");
    }

    #[test]
    fn text_limit_counts_characters_not_bytes() {
        assert!(check_text("").is_ok());
        let max = "é".repeat(MAX_TEXT_CHARS);
        assert!(max.len() > MAX_TEXT_CHARS);
        assert!(check_text(&max).is_ok());
        let over = "x".repeat(MAX_TEXT_CHARS + 1);
        match check_text(&over) {
            Err(ClientError::TextTooLong { chars, limit }) => {
                assert_eq!(chars, MAX_TEXT_CHARS + 1);
                assert_eq!(limit, MAX_TEXT_CHARS);
            }
            other => panic!("expected TextTooLong, got {other:?}"),
        }
    }
}
