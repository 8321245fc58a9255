//! The role matrix, generated from the server's own `/openapi.json` (which is its route
//! table: every route is registered with its operation), so a new route cannot be left
//! out: each operation is called with no token, an unknown one, and each role's.

use std::sync::Arc;

use reqwest::Method;
use serde_json::json;

use crate::database::Fixture;
use crate::server::{ANALYST, OPERATOR, Server, WRITER};

on_both_backends!(every_route_admits_exactly_its_roles);

/// The roles an operation admits, from its `security`: `None` when it is open.
fn admitted(operation: &serde_json::Value) -> Option<Vec<String>> {
    let requirements = operation["security"].as_array()?;
    if requirements
        .iter()
        .any(|r| r.as_object().is_some_and(|o| o.is_empty()))
    {
        return None;
    }
    let mut roles: Vec<String> = requirements
        .iter()
        .filter_map(|r| r["bearer"].as_array())
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect();
    roles.push("operator".to_owned());
    Some(roles)
}

async fn every_route_admits_exactly_its_roles(db: Arc<Fixture>) {
    let server = Server::start(db.url());
    let document = server
        .call(Method::GET, "/openapi.json", None, None, &[])
        .await;
    assert_eq!(document.status, 200);
    let paths = document.body["paths"].as_object().unwrap();
    let mut checked = 0;
    for (path, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            // Every operation states its access; none is left to the default.
            assert!(
                operation["security"].is_array(),
                "{method} {path} declares no security"
            );
            let concrete = path
                .replace("{id}", &uuid::Uuid::now_v7().to_string())
                .replace("{name}", "lead_board")
                .replace("{stream}", "lead-nobody");
            let body = (method == Method::POST).then(|| json!({}));
            let call = |token: Option<&'static str>| {
                let (method, concrete, body) = (method.clone(), concrete.clone(), body.clone());
                let server = &server;
                async move {
                    server
                        .call(method, &concrete, token, body.as_ref(), &[])
                        .await
                        .status
                }
            };
            match admitted(operation) {
                None => {
                    let status = call(None).await;
                    assert!(
                        status != 401 && status != 403,
                        "{method} {path} is open but answered {status}"
                    );
                }
                Some(roles) => {
                    assert_eq!(call(None).await, 401, "{method} {path} without a token");
                    assert_eq!(
                        call(Some("not-a-token")).await,
                        401,
                        "{method} {path} with an unknown token"
                    );
                    for (role, token) in [
                        ("writer", WRITER),
                        ("analyst", ANALYST),
                        ("operator", OPERATOR),
                    ] {
                        let status = call(token).await;
                        if roles.iter().any(|r| r == role) {
                            assert!(
                                status != 401 && status != 403,
                                "{method} {path} refused the {role}: {status}"
                            );
                        } else {
                            assert_eq!(status, 403, "{method} {path} let the {role} in");
                        }
                    }
                }
            }
            checked += 1;
        }
    }
    // The contract's routes for leads, accounts and deals, and the open ones, are all
    // in the document.
    assert!(checked >= 32, "only {checked} operations");
    for (method, path) in [
        ("post", "/leads"),
        ("post", "/leads/{id}/convert"),
        ("get", "/analytics/funnel"),
        ("get", "/admin/audit/verify"),
        ("get", "/streams/{stream}/events"),
        ("get", "/health/ready"),
    ] {
        assert!(paths[path][method].is_object(), "{method} {path} missing");
    }
}
