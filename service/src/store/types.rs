//! The store's wire and result types: messages, thread summaries, pages and their
//! cursors.

use serde::{Deserialize, Serialize};

use super::StoreError;

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The person using the chat.
    User,
    /// The agent's reply.
    Assistant,
}

impl Role {
    /// The stored and wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }

    pub(super) fn parse(s: &str) -> Result<Role, StoreError> {
        match s {
            "user" => Ok(Role::User),
            "assistant" => Ok(Role::Assistant),
            other => Err(StoreError::Corrupt {
                message: format!("a stored message has the unknown role `{other}`"),
            }),
        }
    }
}

/// One thread in a `threads` listing: the wire shape `{thread_id, title, updated_at}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadSummary {
    pub thread_id: String,
    pub title: String,
    /// RFC 3339, UTC.
    pub updated_at: String,
}

/// One stored message: the wire shape `{message_id, role, content, created_at}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    pub message_id: String,
    pub role: Role,
    pub content: String,
    /// RFC 3339, UTC.
    pub created_at: String,
}

/// How much one page of a listing may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageLimit {
    /// At most this many entries.
    pub items: u32,
    /// About this many bytes of JSON (an estimate, erring high); a page holds at
    /// least one entry even when that entry alone is larger.
    pub bytes: usize,
}

/// Entries a page holds when the client names no `limit`.
pub const DEFAULT_PAGE_ITEMS: u32 = 50;
/// The largest `limit` a client may ask for.
pub const MAX_PAGE_ITEMS: u32 = 200;
/// What one entry's JSON costs beyond its variable fields (names, quotes, times).
pub(super) const ENTRY_OVERHEAD_BYTES: usize = 96;

/// Entries of a listing and, when more follow, the cursor of the next page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

impl<T> Default for Page<T> {
    fn default() -> Self {
        Page {
            items: Vec::new(),
            next_cursor: None,
        }
    }
}

/// Where a page of `threads_page` ended: the last thread's update time and id.
pub(super) struct ThreadCursor {
    pub(super) updated_at: i64,
    pub(super) thread_id: String,
}

impl ThreadCursor {
    pub(super) fn parse(cursor: &str) -> Result<ThreadCursor, StoreError> {
        cursor
            .split_once('.')
            .and_then(|(at, id)| {
                Some(ThreadCursor {
                    updated_at: at.parse().ok()?,
                    thread_id: id.to_owned(),
                })
            })
            .filter(|c| !c.thread_id.is_empty())
            .ok_or(StoreError::BadCursor)
    }
}

impl std::fmt::Display for ThreadCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.updated_at, self.thread_id)
    }
}

/// A `thread_page` cursor: the position of the oldest message already sent.
pub(super) fn parse_message_cursor(cursor: &str) -> Result<i64, StoreError> {
    cursor
        .parse::<i64>()
        .ok()
        .filter(|seq| *seq > 0)
        .ok_or(StoreError::BadCursor)
}

/// The result of [`post_user_message`](super::ThreadStore::post_user_message): where
/// the message landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostedMessage {
    pub thread_id: String,
    /// True when the call created the thread (no `thread_id` was given).
    pub created_thread: bool,
    pub message: StoredMessage,
}

/// A user message found by its `client_message_id`, and the reply to it if one was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientMessage {
    pub thread_id: String,
    pub message_id: String,
    pub content: String,
    pub reply: Option<StoredReply>,
}

/// The stored reply to a user message and the run that produced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredReply {
    pub message_id: String,
    pub run_id: String,
}
