//! Who is calling, and what they may do: bearer tokens with roles from
//! `ANNALS_API_TOKENS`, and each route's roles as the OpenAPI document declares them.
//!
//! Invariants: every token is its own principal (no two tokens share a name, an unnamed
//! token being named after its role), so two clients never share an actor or an
//! idempotency key's scope; a presented token is compared with every known token in constant time (by
//! their SHA-256 digests, so lengths leak nothing either); a route the document gives no
//! security is the operator's alone, so a forgotten annotation closes a route rather than
//! opening it.

use std::collections::HashMap;

use axum::http::Method;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Issues commands.
    Writer,
    /// Reads read models and history.
    Analyst,
    /// Everything, including `/admin`, stream and log reads.
    Operator,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Writer, Role::Analyst, Role::Operator];

    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "writer" => Some(Role::Writer),
            "analyst" => Some(Role::Analyst),
            "operator" => Some(Role::Operator),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Writer => "writer",
            Role::Analyst => "analyst",
            Role::Operator => "operator",
        }
    }
}

/// The caller of a request: recorded as the `actor` of every event it causes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub actor: String,
    pub role: Role,
}

impl Caller {
    pub fn anonymous() -> Self {
        Caller {
            actor: "anonymous".to_owned(),
            role: Role::Operator,
        }
    }
}

#[derive(Clone)]
struct Token {
    digest: [u8; 32],
    caller: Caller,
}

/// The known tokens. `None` inside means anonymous mode (no tokens configured).
#[derive(Clone, Default)]
pub struct Tokens(Option<Vec<Token>>);

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            None => f.write_str("Tokens(anonymous)"),
            Some(tokens) => write!(f, "Tokens({} known)", tokens.len()),
        }
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Tokens {
    /// Anonymous mode: every request is the operator `anonymous`.
    pub fn anonymous() -> Self {
        Tokens(None)
    }

    /// Parses `role:token` and `role:name:token` entries, comma-separated.
    pub fn parse(spec: &str) -> Result<Self, ApiError> {
        let mut tokens = Vec::new();
        for (n, entry) in spec.split(',').map(str::trim).enumerate() {
            let bad = |why: &str| {
                ApiError::InvalidSettings(format!("ANNALS_API_TOKENS entry {}: {why}", n + 1))
            };
            let parts: Vec<&str> = entry.splitn(3, ':').collect();
            let (role, name, secret) = match parts.as_slice() {
                [role, secret] => (*role, None, *secret),
                [role, name, secret] => (*role, Some(*name), *secret),
                _ => return Err(bad("expected role:token or role:name:token")),
            };
            let role = Role::parse(role)
                .ok_or_else(|| bad("the role must be writer, analyst or operator"))?;
            if secret.is_empty() {
                return Err(bad("the token is empty"));
            }
            if name.is_some_and(str::is_empty) {
                return Err(bad("the name is empty"));
            }
            let digest = digest(secret);
            if tokens.iter().any(|t: &Token| t.digest == digest) {
                return Err(bad("the same token is given twice"));
            }
            // Every token is its own principal: the actor of its events, the scope of its
            // idempotency keys. An unnamed token is named after its role.
            let actor = name.unwrap_or(role.as_str()).to_owned();
            if tokens.iter().any(|t: &Token| t.caller.actor == actor) {
                return Err(bad(&format!(
                    "another token is named {actor:?} too (a token given as role:token is \
                     named after its role); give each token a name of its own, as \
                     role:name:token"
                )));
            }
            tokens.push(Token {
                digest,
                caller: Caller { actor, role },
            });
        }
        Ok(Tokens(Some(tokens)))
    }

    pub fn is_anonymous(&self) -> bool {
        self.0.is_none()
    }

    /// Who an `Authorization` header value names, if anyone.
    pub fn caller(&self, authorization: Option<&str>) -> Option<Caller> {
        let Some(tokens) = &self.0 else {
            return Some(Caller::anonymous());
        };
        // The scheme's name is case-insensitive (RFC 9110).
        let (scheme, presented) = authorization?.trim().split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let presented = presented.trim();
        let presented = digest(presented);
        // Every token is compared, whichever matches, so timing tells nothing.
        let mut found = None;
        for token in tokens {
            if bool::from(token.digest.ct_eq(&presented)) {
                found = Some(token.caller.clone());
            }
        }
        found
    }
}

/// Who may call a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// No token needed.
    Open,
    /// These roles (the operator always may).
    Roles(Vec<Role>),
}

impl Access {
    pub fn admits(&self, role: Role) -> bool {
        match self {
            Access::Open => true,
            Access::Roles(roles) => role == Role::Operator || roles.contains(&role),
        }
    }
}

/// Each route's access, read from the OpenAPI document's `security`: `[{}]` is open,
/// `[{"bearer": ["writer"]}]` names roles, and none at all means the operator's only.
#[derive(Debug, Clone, Default)]
pub struct RouteAccess(HashMap<(Method, String), Access>);

impl RouteAccess {
    pub fn from_openapi(document: &Value) -> Self {
        let mut routes = HashMap::new();
        let Some(paths) = document["paths"].as_object() else {
            return RouteAccess(routes);
        };
        for (path, item) in paths {
            let Some(operations) = item.as_object() else {
                continue;
            };
            for (method, operation) in operations {
                let Ok(method) = Method::from_bytes(method.to_uppercase().as_bytes()) else {
                    continue;
                };
                routes.insert((method, path.clone()), access(&operation["security"]));
            }
        }
        RouteAccess(routes)
    }

    pub fn of(&self, method: &Method, path: &str) -> Access {
        self.0
            .get(&(method.clone(), path.to_owned()))
            .cloned()
            .unwrap_or(Access::Roles(vec![Role::Operator]))
    }
}

fn access(security: &Value) -> Access {
    let Some(requirements) = security.as_array() else {
        return Access::Roles(vec![Role::Operator]);
    };
    if requirements
        .iter()
        .any(|r| r.as_object().is_some_and(|o| o.is_empty()))
    {
        return Access::Open;
    }
    let roles = requirements
        .iter()
        .filter_map(|r| r["bearer"].as_array())
        .flatten()
        .filter_map(|scope| scope.as_str().and_then(Role::parse))
        .collect();
    Access::Roles(roles)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_name_their_actor_and_role_and_unknown_ones_name_nobody() {
        let tokens = Tokens::parse("writer:w-secret, analyst:ana:a-secret").unwrap();
        assert_eq!(
            tokens.caller(Some("Bearer w-secret")),
            Some(Caller {
                actor: "writer".into(),
                role: Role::Writer
            })
        );
        assert_eq!(
            tokens.caller(Some("Bearer a-secret")).map(|c| c.actor),
            Some("ana".into())
        );
        assert_eq!(tokens.caller(Some("Bearer nope")), None);
        assert_eq!(tokens.caller(Some("w-secret")), None);
        assert_eq!(
            tokens.caller(Some("bearer w-secret")).map(|c| c.role),
            Some(Role::Writer)
        );
        assert_eq!(tokens.caller(Some("Basic w-secret")), None);
        assert_eq!(tokens.caller(None), None);
    }

    #[test]
    fn bad_token_settings_are_refused() {
        for spec in [
            "admin:x",
            "writer",
            "writer:",
            "writer::x",
            "",
            "writer:same,operator:same",
            "writer:one,writer:two",
            "writer:w1,analyst:writer:a1",
            "writer:bob:w1,operator:bob:o1",
        ] {
            assert!(Tokens::parse(spec).is_err(), "{spec}");
        }
    }

    #[test]
    fn routes_without_security_belong_to_the_operator() {
        let doc = serde_json::json!({"paths": {
            "/open": {"get": {"security": [{}]}},
            "/leads": {"post": {"security": [{"bearer": ["writer"]}]}},
            "/forgotten": {"get": {}},
        }});
        let routes = RouteAccess::from_openapi(&doc);
        assert_eq!(routes.of(&Method::GET, "/open"), Access::Open);
        assert!(routes.of(&Method::POST, "/leads").admits(Role::Writer));
        assert!(!routes.of(&Method::POST, "/leads").admits(Role::Analyst));
        assert!(!routes.of(&Method::GET, "/forgotten").admits(Role::Writer));
        assert!(routes.of(&Method::GET, "/forgotten").admits(Role::Operator));
    }
}
