//! `open_account`, `balance`, `transfer`: a small bank ledger.
//!
//! An account `<name>` (1..=64 characters of `[a-z0-9_-]`) is the key `acct/<name>`; its
//! value is the balance as a canonical decimal `u64` in ASCII (digits only, no sign, no
//! leading zero except `0` itself). A stored value in any other form is refused as corrupt.
//!
//! ```text
//! open_account  {"name":"alice","balance":100}         -> {"name":"alice","balance":100}
//! balance       {"name":"alice"}                       -> {"name":"alice","balance":100}
//! transfer      {"from":"alice","to":"bob","amount":5} -> {"amount":5,
//!                                                          "from":{"name":"alice","balance":95},
//!                                                          "to":{"name":"bob","balance":10}}
//! ```
//!
//! `transfer` reads both balances in one round trip (`Db::get_many`).
//!
//! `open_account` refuses an existing account; `balance` and `transfer` refuse unknown
//! accounts; `transfer` refuses `amount` 0, a transfer to the same account, an overdraft,
//! and a credit that would overflow. Refusals are [`HandlerError::Rejected`] and write
//! nothing.

use alloc::format;
use alloc::string::String;
use alloc::string::ToString;
use alloc::vec::Vec;

use mayfly_sdk::{Ctx, HandlerError};
use serde::{Deserialize, Serialize};

use crate::payload::{check_name, from_json, to_json};

/// Prefix of account keys.
pub const ACCOUNT_PREFIX: &str = "acct/";

/// The key of account `name`.
pub fn account_key(name: &str) -> String {
    format!("{ACCOUNT_PREFIX}{name}")
}

/// Parses a stored balance: a canonical decimal `u64`.
pub fn parse_balance(value: &[u8]) -> Option<u64> {
    let canonical = match value {
        [] => false,
        [b'0'] => true,
        [b'0', ..] => false,
        _ => value.len() <= 20 && value.iter().all(u8::is_ascii_digit),
    };
    if !canonical {
        return None;
    }
    core::str::from_utf8(value).ok()?.parse().ok()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenRequest {
    name: String,
    #[serde(default)]
    balance: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BalanceRequest {
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferRequest {
    from: String,
    to: String,
    amount: u64,
}

#[derive(Debug, Serialize)]
struct Account<'a> {
    name: &'a str,
    balance: u64,
}

#[derive(Debug, Serialize)]
struct TransferResult<'a> {
    amount: u64,
    from: Account<'a>,
    to: Account<'a>,
}

/// Account `name`'s balance from its stored value: absent or corrupt is an error.
fn stored_balance(name: &str, value: Option<Vec<u8>>) -> Result<u64, HandlerError> {
    let value = value.ok_or_else(|| HandlerError::rejected(format!("unknown account {name}")))?;
    parse_balance(&value)
        .ok_or_else(|| HandlerError::rejected(format!("account {name} holds a corrupt balance")))
}

fn existing_balance(ctx: &mut Ctx<'_>, name: &str) -> Result<u64, HandlerError> {
    let value = ctx.db().get(account_key(name).as_bytes())?;
    stored_balance(name, value)
}

fn write_balance(ctx: &mut Ctx<'_>, name: &str, balance: u64) -> Result<(), HandlerError> {
    ctx.db()
        .put(account_key(name).as_bytes(), balance.to_string().as_bytes())?;
    Ok(())
}

/// `open_account`: creates `acct/<name>` with `balance` (default 0). See the
/// [module docs](self).
pub fn open_account(ctx: &mut Ctx<'_>, payload: &[u8]) -> Result<Vec<u8>, HandlerError> {
    let req: OpenRequest = from_json(payload)?;
    check_name("account", &req.name)?;
    if ctx.db().get(account_key(&req.name).as_bytes())?.is_some() {
        return Err(HandlerError::rejected(format!(
            "account {} already exists",
            req.name
        )));
    }
    write_balance(ctx, &req.name, req.balance)?;
    to_json(&Account {
        name: &req.name,
        balance: req.balance,
    })
}

/// `balance`: reads an account's balance. See the [module docs](self).
pub fn balance(ctx: &mut Ctx<'_>, payload: &[u8]) -> Result<Vec<u8>, HandlerError> {
    let req: BalanceRequest = from_json(payload)?;
    check_name("account", &req.name)?;
    let balance = existing_balance(ctx, &req.name)?;
    to_json(&Account {
        name: &req.name,
        balance,
    })
}

/// `transfer`: moves `amount` from one account to another. See the [module docs](self).
pub fn transfer(ctx: &mut Ctx<'_>, payload: &[u8]) -> Result<Vec<u8>, HandlerError> {
    let req: TransferRequest = from_json(payload)?;
    check_name("account", &req.from)?;
    check_name("account", &req.to)?;
    if req.amount == 0 {
        return Err(HandlerError::bad_request("amount must be greater than 0"));
    }
    if req.from == req.to {
        return Err(HandlerError::bad_request(
            "cannot transfer from an account to itself",
        ));
    }
    // Both balances in one round trip.
    let (from_key, to_key) = (account_key(&req.from), account_key(&req.to));
    let values = ctx
        .db()
        .get_many(&[from_key.as_bytes(), to_key.as_bytes()])?;
    let [from_value, to_value]: [Option<Vec<u8>>; 2] = values
        .try_into()
        .map_err(|_| HandlerError::rejected("the agent returned a wrong number of values"))?;
    let from_balance = stored_balance(&req.from, from_value)?;
    let to_balance = stored_balance(&req.to, to_value)?;
    let new_from = from_balance.checked_sub(req.amount).ok_or_else(|| {
        HandlerError::rejected(format!(
            "insufficient funds: {} has {from_balance}, needs {}",
            req.from, req.amount
        ))
    })?;
    let new_to = to_balance.checked_add(req.amount).ok_or_else(|| {
        HandlerError::rejected(format!("the balance of {} would overflow", req.to))
    })?;
    write_balance(ctx, &req.from, new_from)?;
    write_balance(ctx, &req.to, new_to)?;
    to_json(&TransferResult {
        amount: req.amount,
        from: Account {
            name: &req.from,
            balance: new_from,
        },
        to: Account {
            name: &req.to,
            balance: new_to,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mayfly_sdk::{Db, MemDb};
    use serde_json::{json, Value};

    fn call(
        db: &mut MemDb,
        handler: mayfly_sdk::Handler,
        payload: Value,
    ) -> Result<Value, HandlerError> {
        let mut ctx = Ctx::new(db, [0; 16], [0; 32]);
        let out = handler(&mut ctx, payload.to_string().as_bytes())?;
        Ok(serde_json::from_slice(&out).unwrap())
    }

    fn bank() -> MemDb {
        MemDb::from_entries([("acct/alice", "100"), ("acct/bob", "5")])
    }

    fn rejected(r: Result<Value, HandlerError>, needle: &str) {
        match r {
            Err(HandlerError::Rejected { reason }) => assert!(reason.contains(needle), "{reason}"),
            other => panic!("expected a rejection containing {needle:?}, got {other:?}"),
        }
    }

    #[test]
    fn balances_parse_only_in_canonical_form() {
        assert_eq!(parse_balance(b"0"), Some(0));
        assert_eq!(parse_balance(b"42"), Some(42));
        assert_eq!(parse_balance(b"18446744073709551615"), Some(u64::MAX));
        for bad in [
            &b""[..],
            b"007",
            b"00",
            b"-1",
            b"+1",
            b" 1",
            b"1 ",
            b"1.0",
            b"18446744073709551616",
            b"123456789012345678901",
            b"note text",
        ] {
            assert_eq!(parse_balance(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn transfer_moves_money_and_returns_new_balances() {
        let mut db = bank();
        let out = call(
            &mut db,
            transfer,
            json!({"from":"alice","to":"bob","amount":30}),
        )
        .unwrap();
        assert_eq!(
            out,
            json!({"amount":30,"from":{"name":"alice","balance":70},"to":{"name":"bob","balance":35}})
        );
        assert_eq!(db.value(b"acct/alice"), Some(&b"70"[..]));
        assert_eq!(db.value(b"acct/bob"), Some(&b"35"[..]));
        // Draining an account exactly is allowed.
        call(
            &mut db,
            transfer,
            json!({"from":"bob","to":"alice","amount":35}),
        )
        .unwrap();
        assert_eq!(db.value(b"acct/bob"), Some(&b"0"[..]));
    }

    #[test]
    fn overdraft_unknown_accounts_and_overflow_are_rejected_without_writes() {
        let mut db = bank();
        let before = db.data().clone();
        rejected(
            call(
                &mut db,
                transfer,
                json!({"from":"bob","to":"alice","amount":6}),
            ),
            "insufficient funds: bob has 5, needs 6",
        );
        rejected(
            call(
                &mut db,
                transfer,
                json!({"from":"alice","to":"carol","amount":1}),
            ),
            "unknown account carol",
        );
        rejected(
            call(
                &mut db,
                transfer,
                json!({"from":"carol","to":"alice","amount":1}),
            ),
            "unknown account carol",
        );
        db.insert("acct/rich", u64::MAX.to_string());
        let before_rich = db.data().clone();
        rejected(
            call(
                &mut db,
                transfer,
                json!({"from":"alice","to":"rich","amount":1}),
            ),
            "overflow",
        );
        assert_eq!(db.data(), &before_rich);
        db.insert("acct/broken", "lots");
        rejected(
            call(
                &mut db,
                transfer,
                json!({"from":"broken","to":"alice","amount":1}),
            ),
            "corrupt balance",
        );
        db.delete(b"acct/rich").unwrap();
        db.delete(b"acct/broken").unwrap();
        assert_eq!(db.data(), &before);
    }

    #[test]
    fn invalid_transfers_are_bad_requests() {
        let mut db = bank();
        for payload in [
            json!({"from":"alice","to":"bob","amount":0}),
            json!({"from":"alice","to":"bob","amount":-1}),
            json!({"from":"alice","to":"bob","amount":1.5}),
            json!({"from":"alice","to":"bob","amount":"5"}),
            json!({"from":"alice","to":"alice","amount":1}),
            json!({"from":"Alice","to":"bob","amount":1}),
            json!({"from":"../x","to":"bob","amount":1}),
            json!({"from":"alice","to":"bob"}),
            json!({"from":"alice","to":"bob","amount":1,"memo":"x"}),
        ] {
            let err = call(&mut db, transfer, payload.clone()).unwrap_err();
            assert!(
                matches!(err, HandlerError::BadRequest { .. }),
                "{payload}: {err:?}"
            );
        }
        assert_eq!(db.data(), bank().data());
    }

    #[test]
    fn open_account_creates_once_and_balance_reads() {
        let mut db = MemDb::new();
        assert_eq!(
            call(&mut db, open_account, json!({"name":"carol","balance":12})).unwrap(),
            json!({"name":"carol","balance":12})
        );
        assert_eq!(db.value(b"acct/carol"), Some(&b"12"[..]));
        rejected(
            call(&mut db, open_account, json!({"name":"carol","balance":99})),
            "already exists",
        );
        assert_eq!(db.value(b"acct/carol"), Some(&b"12"[..]));
        call(&mut db, open_account, json!({"name":"dave"})).unwrap();
        assert_eq!(db.value(b"acct/dave"), Some(&b"0"[..]));
        assert_eq!(
            call(&mut db, balance, json!({"name":"carol"})).unwrap(),
            json!({"name":"carol","balance":12})
        );
        rejected(
            call(&mut db, balance, json!({"name":"erin"})),
            "unknown account erin",
        );
        let err = call(&mut db, open_account, json!({"name":"a/b"})).unwrap_err();
        assert!(matches!(err, HandlerError::BadRequest { .. }));
    }
}
