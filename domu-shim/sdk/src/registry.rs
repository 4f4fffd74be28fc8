//! [`Registry`]: the handlers built into a template, by name.
//!
//! Names are 1..=64 bytes of `[a-z0-9_.-]` (the same rule as the ledger and the wire's
//! `Start` message), e.g. `transfer`, `kv`, `test.crash`.

use alloc::borrow::ToOwned;
use alloc::string::String;

use alloc::collections::BTreeMap;

use crate::handler::Handler;
use crate::limits::MAX_HANDLER_NAME_LEN;

/// A handler could not be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The name is empty, too long, or has a byte outside `[a-z0-9_.-]`.
    #[error("invalid handler name {name:?}: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A handler of that name is already registered.
    #[error("handler {name:?} is already registered")]
    Duplicate {
        /// The name.
        name: String,
    },
}

/// Checks a handler name: 1..=64 bytes of `[a-z0-9_.-]`.
pub fn check_handler_name(name: &str) -> Result<(), RegistryError> {
    let reason = match mayfly_names::check_name(name.as_bytes(), MAX_HANDLER_NAME_LEN) {
        Ok(()) => return Ok(()),
        Err(mayfly_names::Fault::Empty) => "empty",
        Err(mayfly_names::Fault::TooLong { .. }) => "longer than 64 bytes",
        Err(mayfly_names::Fault::Byte { .. }) => "bytes outside [a-z0-9_.-]",
    };
    Err(RegistryError::InvalidName {
        name: name.to_owned(),
        reason,
    })
}

/// Handler names to handlers.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    handlers: BTreeMap<String, Handler>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `handler` under `name`; refuses an invalid name or one already taken.
    pub fn register(&mut self, name: &str, handler: Handler) -> Result<(), RegistryError> {
        check_handler_name(name)?;
        if self.handlers.contains_key(name) {
            return Err(RegistryError::Duplicate {
                name: name.to_owned(),
            });
        }
        self.handlers.insert(name.to_owned(), handler);
        Ok(())
    }

    /// The handler registered under `name`.
    pub fn get(&self, name: &str) -> Option<Handler> {
        self.handlers.get(name).copied()
    }

    /// The registered names, in ascending order.
    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.handlers.keys().map(String::as_str)
    }

    /// Number of handlers.
    pub fn len(&self) -> usize {
        self.handlers.len()
    }

    /// Whether no handler is registered.
    pub fn is_empty(&self) -> bool {
        self.handlers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Ctx, HandlerError};

    fn one(_: &mut Ctx<'_>, _: &[u8]) -> Result<Vec<u8>, HandlerError> {
        Ok(vec![1])
    }

    fn two(_: &mut Ctx<'_>, _: &[u8]) -> Result<Vec<u8>, HandlerError> {
        Ok(vec![2])
    }

    #[test]
    fn register_get_and_list() {
        let mut r = Registry::new();
        assert!(r.is_empty());
        r.register("zeta", one).unwrap();
        r.register("alpha.v2", two).unwrap();
        r.register("a-b_c.9", one).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(
            r.names().collect::<Vec<_>>(),
            ["a-b_c.9", "alpha.v2", "zeta"]
        );
        let mut db = crate::MemDb::new();
        let mut ctx = Ctx::new(&mut db, [0; 16], [0; 32]);
        assert_eq!(r.get("alpha.v2").unwrap()(&mut ctx, b"").unwrap(), [2]);
        assert_eq!(r.get("zeta").unwrap()(&mut ctx, b"").unwrap(), [1]);
        assert!(r.get("missing").is_none());
    }

    #[test]
    fn duplicates_and_bad_names_are_refused() {
        let mut r = Registry::new();
        r.register("kv", one).unwrap();
        assert_eq!(
            r.register("kv", two),
            Err(RegistryError::Duplicate { name: "kv".into() })
        );
        // The first registration stands.
        let mut db = crate::MemDb::new();
        let mut ctx = Ctx::new(&mut db, [0; 16], [0; 32]);
        assert_eq!(r.get("kv").unwrap()(&mut ctx, b"").unwrap(), [1]);
        let long = "a".repeat(65);
        for bad in ["", "Kv", "k v", "k/v", "kv\n", "é", long.as_str()] {
            assert!(
                matches!(r.register(bad, one), Err(RegistryError::InvalidName { .. })),
                "{bad:?} accepted"
            );
        }
        assert!(r.register(&"a".repeat(64), one).is_ok());
        assert_eq!(r.len(), 2);
    }
}
