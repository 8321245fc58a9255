//! The role matrix of `api.md`, checked on every route of the server's own
//! `/openapi.json` (its route table: every route is registered with its operation), so
//! a new route cannot be left out: each is called with no token, an unknown one, and
//! each role's.

use std::sync::Arc;

use reqwest::Method;
use serde_json::json;

use crate::database::Fixture;
use crate::server::{ANALYST, OPERATOR, Server, WRITER};

on_both_backends!(every_route_admits_exactly_its_roles);

/// `api.md`'s roles, route by route: `None` is open, otherwise the role that may call
/// it besides the operator (who may call everything).
const CONTRACT: [(&str, &str, Option<&str>); 55] = [
    ("post", "/leads", Some("writer")),
    ("post", "/leads/{id}/signals", Some("writer")),
    ("post", "/leads/{id}/assign", Some("writer")),
    ("post", "/leads/{id}/disqualify", Some("writer")),
    ("post", "/leads/{id}/convert", Some("writer")),
    ("post", "/accounts", Some("writer")),
    ("post", "/accounts/{id}/rename", Some("writer")),
    ("post", "/accounts/{id}/tier", Some("writer")),
    ("post", "/deals", Some("writer")),
    ("post", "/deals/{id}/advance", Some("writer")),
    ("post", "/deals/{id}/amount", Some("writer")),
    ("post", "/deals/{id}/win", Some("writer")),
    ("post", "/deals/{id}/lose", Some("writer")),
    ("get", "/leads", Some("analyst")),
    ("get", "/leads/{id}", Some("analyst")),
    ("get", "/accounts/{id}", Some("analyst")),
    ("get", "/deals", Some("analyst")),
    ("get", "/deals/{id}", Some("analyst")),
    ("get", "/analytics/funnel", Some("analyst")),
    ("get", "/analytics/pipeline", Some("analyst")),
    ("get", "/leads/{id}/history", Some("analyst")),
    ("post", "/leads/{id}/erase", Some("operator")),
    ("get", "/leads/{id}/personal-data", Some("operator")),
    ("get", "/accounts/{id}/history", Some("analyst")),
    ("get", "/deals/{id}/history", Some("analyst")),
    ("get", "/streams/{stream}/events", Some("operator")),
    ("get", "/events", Some("operator")),
    ("get", "/admin/projections", Some("operator")),
    (
        "post",
        "/admin/projections/{name}/rebuild",
        Some("operator"),
    ),
    ("post", "/admin/projections/{name}/verify", Some("operator")),
    ("get", "/admin/audit/verify", Some("operator")),
    ("get", "/admin/consumers", Some("operator")),
    ("get", "/admin/routing", Some("operator")),
    ("post", "/orders", Some("writer")),
    ("post", "/orders/{id}/pay", Some("writer")),
    ("post", "/orders/{id}/cancel", Some("writer")),
    ("get", "/orders/{id}/history", Some("analyst")),
    ("get", "/orders", Some("analyst")),
    ("get", "/orders/{id}", Some("analyst")),
    ("post", "/subscriptions/{id}/expand", Some("writer")),
    ("post", "/subscriptions/{id}/contract", Some("writer")),
    ("post", "/subscriptions/{id}/churn", Some("writer")),
    ("get", "/subscriptions/{id}/history", Some("analyst")),
    ("get", "/subscriptions", Some("analyst")),
    ("get", "/subscriptions/{id}", Some("analyst")),
    ("get", "/analytics/response-times", Some("analyst")),
    ("get", "/analytics/revenue", Some("analyst")),
    ("put", "/admin/routing", Some("operator")),
    ("get", "/admin/consumers/{name}/parked", Some("operator")),
    (
        "post",
        "/admin/consumers/{name}/parked/{position}/retry",
        Some("operator"),
    ),
    (
        "post",
        "/admin/consumers/{name}/parked/{position}/skip",
        Some("operator"),
    ),
    ("get", "/health/live", None),
    ("get", "/health/ready", None),
    ("get", "/metrics", None),
    ("get", "/openapi.json", None),
];

async fn every_route_admits_exactly_its_roles(db: Arc<Fixture>) {
    let server = Server::start(db.url());
    let document = server
        .call(Method::GET, "/openapi.json", None, None, &[])
        .await;
    assert_eq!(document.status, 200);
    let paths = document.body["paths"].as_object().unwrap();
    // The server's routes are exactly the contract's: a route added without a line in
    // the contract fails here, and so does a route the contract has that is missing.
    let mut served: Vec<(String, String)> = paths
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .map(move |method| (method.clone(), path.clone()))
        })
        .collect();
    served.sort();
    let mut contracted: Vec<(String, String)> = CONTRACT
        .iter()
        .map(|(method, path, _)| (method.to_string(), path.to_string()))
        .collect();
    contracted.sort();
    assert_eq!(served, contracted);

    for (method, path, role) in CONTRACT {
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let concrete = path
            .replace("{id}", &uuid::Uuid::now_v7().to_string())
            .replace("{name}", "lead_board")
            .replace("{stream}", "lead-nobody")
            .replace("{position}", "1");
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
        let Some(role) = role else {
            let status = call(None).await;
            assert!(
                status != 401 && status != 403,
                "{method} {path} is open but answered {status}"
            );
            continue;
        };
        assert_eq!(call(None).await, 401, "{method} {path} without a token");
        assert_eq!(
            call(Some("not-a-token")).await,
            401,
            "{method} {path} with an unknown token"
        );
        for (caller, token) in [
            ("writer", WRITER),
            ("analyst", ANALYST),
            ("operator", OPERATOR),
        ] {
            let status = call(token).await;
            if caller == role || caller == "operator" {
                assert!(
                    status != 401 && status != 403,
                    "{method} {path} refused the {caller}: {status}"
                );
            } else {
                assert_eq!(status, 403, "{method} {path} let the {caller} in");
            }
        }
    }
}
