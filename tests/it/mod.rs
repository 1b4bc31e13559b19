pub mod adapters;
pub mod cli;
pub mod common;
pub mod oracle_models;
pub mod smollm2;
pub mod train;
