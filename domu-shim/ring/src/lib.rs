//! Placeholder: the ring crate is being written.
