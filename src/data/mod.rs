//! Data: conversations and preference pairs from JSONL, chat templates, and tokenization with
//! assistant masks.

pub mod cache;
pub mod check;
pub mod conversation;
pub mod encode;
pub mod packing;
pub mod preference;
pub mod template;
