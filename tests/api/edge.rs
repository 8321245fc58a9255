//! The edge under hostile and careless clients (issue 27): what an anonymous client, a
//! page in a browser or a retrying client can do to the real binary, over real sockets,
//! each with a bounded count and time.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::database::Fixture;
use crate::server::{MASTER_KEY, OPERATOR, Server, TOKENS, WRITER, annals, lead};

on_both_backends!(a_command_cut_by_the_timeout_wrote_nothing_and_its_retry_never_duplicates);

/// A server on a new SQLite file in `dir`, anonymous (loopback only), with `env`.
fn anonymous(dir: &tempfile::TempDir, env: &[(&str, &str)]) -> Server {
    let url = format!("sqlite://{}", dir.path().join("edge.db").display());
    Server::start_with(&url, env)
}

fn address(server: &Server) -> String {
    server.base.trim_start_matches("http://").to_owned()
}

/// Reads until the server closes the connection or `limit` passes; whether it closed.
fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let started = Instant::now();
    let mut buffer = [0u8; 4096];
    while started.elapsed() < limit {
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        match stream.read(&mut buffer) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

/// The sockets a process holds open (its listener and its connections).
fn sockets_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter(|target| target.to_string_lossy().starts_with("socket:"))
                .count()
        })
        .unwrap_or(0)
}

/// Item 1: A client may send any token as a method, and any path: neither becomes a label,
/// so `/metrics` keeps its size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_labels_take_only_known_methods_and_matched_routes() {
    let dir = tempfile::tempdir().unwrap();
    let server = anonymous(&dir, &[]);
    let client = reqwest::Client::new();
    for n in 0..300 {
        let method = Method::from_bytes(format!("INVENTED{n}").as_bytes()).unwrap();
        let answer = client
            .request(method, format!("{}/leads/made-up-{n}", server.base))
            .send()
            .await
            .unwrap();
        assert!(answer.status().is_client_error());
    }
    let metrics = reqwest::get(format!("{}/metrics", server.base))
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.unwrap();
    assert!(!text.contains("INVENTED"), "a raw method became a label");
    assert!(!text.contains("made-up"), "a raw path became a label");
    assert!(text.contains("method=\"other\""), "{text}");
    // 300 invented methods and paths: the series of one (other, unmatched, 404 or 405).
    let series = text
        .lines()
        .filter(|l| l.starts_with("annals_http_requests_total{"))
        .count();
    assert!(series <= 6, "{series} request series:\n{text}");
}

/// Item 2: A client that sends half its headers, or stays idle after an answer, is
/// disconnected at the header-read timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_idle_connection_is_closed_at_the_header_read_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let server = anonymous(&dir, &[("ANNALS_HEADER_READ_TIMEOUT", "1s")]);
    let host = address(&server);

    let mut half = TcpStream::connect(&host).unwrap();
    half.write_all(format!("GET /health/live HTTP/1.1\r\nHost: {host}\r\nX-Slow: ").as_bytes())
        .unwrap();
    let started = Instant::now();
    assert!(
        closed_within(&mut half, Duration::from_secs(6)),
        "a connection with half its headers stayed open"
    );
    assert!(started.elapsed() >= Duration::from_millis(800));

    let mut idle = TcpStream::connect(&host).unwrap();
    idle.write_all(format!("GET /health/live HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .unwrap();
    let mut answer = [0u8; 1024];
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let read = idle.read(&mut answer).unwrap();
    assert!(String::from_utf8_lossy(&answer[..read]).starts_with("HTTP/1.1 200"));
    assert!(
        closed_within(&mut idle, Duration::from_secs(6)),
        "an idle keep-alive connection stayed open"
    );
}

/// Item 2: A client that asks for answers and never reads them is disconnected once its
/// answers stop moving for the header-read timeout: it holds no connection for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_its_answers_is_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let server = anonymous(&dir, &[("ANNALS_HEADER_READ_TIMEOUT", "1s")]);
    let host = address(&server);
    let baseline = sockets_of(server.pid());
    // Sixty pipelined requests for the document (some 20 MB of answers), never read:
    // the socket buffers fill and the server's writes stall.
    let mut deaf = TcpStream::connect(&host).unwrap();
    let request = format!("GET /openapi.json HTTP/1.1\r\nHost: {host}\r\n\r\n");
    deaf.write_all(request.repeat(60).as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        sockets_of(server.pid()),
        baseline + 1,
        "the connection is open"
    );
    let started = Instant::now();
    while sockets_of(server.pid()) > baseline && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        sockets_of(server.pid()),
        baseline,
        "a client that reads nothing still holds its connection"
    );
    drop(deaf);
}

/// Item 2: Past the connection cap, connections wait to be accepted: the server never holds
/// more, and once the slow ones are timed out, it answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_holds_no_more_connections_than_its_cap() {
    let dir = tempfile::tempdir().unwrap();
    let server = anonymous(
        &dir,
        &[
            ("ANNALS_HEADER_READ_TIMEOUT", "2s"),
            ("ANNALS_MAX_CONNECTIONS", "8"),
        ],
    );
    let host = address(&server);
    let baseline = sockets_of(server.pid());
    let silent: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(&host).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let held = sockets_of(server.pid());
    assert!(
        held <= baseline + 8,
        "the server holds {held} sockets ({baseline} before 40 silent connections, cap 8)"
    );
    // The silent connections are timed out eight at a time; then the server answers.
    let started = Instant::now();
    let live = server
        .try_call(Method::GET, "/health/live", None, None, &[])
        .await
        .expect("the server answers once the silent connections are timed out");
    assert_eq!(live.status, 200);
    assert!(started.elapsed() < Duration::from_secs(25));
    drop(silent);
}

/// Item 2: A request stalled in flight delays a shutdown by no more than the grace; the
/// projections still stop at a checkpoint and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_delays_the_shutdown_by_no_more_than_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let server = anonymous(
        &dir,
        &[
            ("ANNALS_SHUTDOWN_GRACE", "1s"),
            ("ANNALS_REQUEST_TIMEOUT_MS", "120000"),
        ],
    );
    let host = address(&server);
    let id = server.command("/leads", lead("ada")).await["id"].clone();
    // A command whose body never comes whole.
    let mut stalled = TcpStream::connect(&host).unwrap();
    stalled
        .write_all(
            format!(
                "POST /leads HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
                 Content-Length: 1000\r\n\r\n{{\"email\": "
            )
            .as_bytes(),
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let status = server.terminate();
    let took = started.elapsed();
    assert!(status.success(), "{status:?}\n{}", server.logs());
    assert!(took < Duration::from_secs(8), "the shutdown took {took:?}");
    let logs = server.logs();
    assert!(
        logs.contains("still in flight after the shutdown grace"),
        "{logs}"
    );
    assert!(
        logs.contains("stopping projections and processes"),
        "{logs}"
    );
    assert!(logs.contains("stopped"), "{logs}");
    drop(stalled);
    let again = anonymous(&dir, &[]);
    assert_eq!(
        again
            .read(&format!("/leads/{}/history", id.as_str().unwrap()))
            .await["version"],
        1
    );
}

/// Item 3: With a request timeout far too short, every command answered 503 wrote nothing,
/// and retrying each with its key ends with exactly one account per key.
async fn a_command_cut_by_the_timeout_wrote_nothing_and_its_retry_never_duplicates(
    db: Arc<Fixture>,
) {
    let server = Arc::new(Server::start_with(
        db.url(),
        &[
            ("ANNALS_API_TOKENS", TOKENS),
            ("ANNALS_REQUEST_TIMEOUT_MS", "3"),
        ],
    ));
    // The log is read through a second server, whose reads are not cut at 3 ms.
    let reader = Server::start(db.url());
    let opens = 120;
    let mut answered: Vec<Option<String>> = vec![None; opens];
    for round in 0..40 {
        let pending: Vec<usize> = (0..opens).filter(|n| answered[*n].is_none()).collect();
        if pending.is_empty() {
            break;
        }
        let mut tasks = Vec::new();
        for n in pending {
            let server = server.clone();
            tasks.push(tokio::spawn(async move {
                let key = format!("open-{n}");
                let body = json!({"name": format!("Account {n}"), "tier": "standard"});
                let answer = server
                    .call(
                        Method::POST,
                        "/accounts",
                        WRITER,
                        Some(&body),
                        &[("idempotency-key", &key)],
                    )
                    .await;
                (n, answer)
            }));
        }
        for task in tasks {
            let (n, answer) = task.await.unwrap();
            match answer.status {
                201 => answered[n] = Some(answer.body["id"].as_str().unwrap().to_owned()),
                503 => {
                    assert_eq!(answer.code(), "timeout", "{}", answer.body);
                    assert_eq!(answer.header("retry-after"), Some("1"));
                }
                409 => assert_eq!(answer.code(), "idempotency-key-in-use"),
                other => panic!("round {round}: {other} {}", answer.body),
            }
        }
        // Each 503 wrote nothing: the log holds one account per 201, no more.
        let stored = accounts_opened(&reader).await;
        let accepted = answered.iter().flatten().count();
        assert_eq!(stored.len(), accepted, "round {round}");
    }
    let ids: std::collections::BTreeSet<&String> = answered.iter().flatten().collect();
    let stored = accounts_opened(&reader).await;
    assert_eq!(
        ids.len(),
        stored.len(),
        "one account per key, and each answered"
    );
    for id in &stored {
        assert!(ids.contains(id), "{id} was stored but never answered");
    }
}

/// The ids of every `AccountOpened` in the log.
async fn accounts_opened(server: &Server) -> Vec<String> {
    let mut ids = Vec::new();
    let mut path = "/events?type=AccountOpened&limit=500".to_owned();
    loop {
        let page = server.call(Method::GET, &path, OPERATOR, None, &[]).await;
        assert_eq!(page.status, 200, "{}", page.body);
        for event in page.body["items"].as_array().unwrap() {
            ids.push(
                event["stream"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("account-")
                    .to_owned(),
            );
        }
        match page.body["next_cursor"].as_str() {
            Some(cursor) => path = format!("/events?type=AccountOpened&limit=500&cursor={cursor}"),
            None => return ids,
        }
    }
}

/// Item 5: A page on the same machine cannot drive an anonymous server: another Host is
/// refused, a state change from another origin is refused, a body that is not declared
/// JSON is refused; nothing is stored by any of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_another_origin_or_host_cannot_drive_an_anonymous_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = anonymous(
        &dir,
        &[
            ("ANNALS_ALLOWED_HOSTS", "crm.internal"),
            ("ANNALS_ALLOWED_ORIGINS", "https://crm.example.com"),
        ],
    );
    let client = reqwest::Client::new();
    let send = |method: Method, path: &str, headers: &[(&str, &str)], body: Option<&str>| {
        let mut request = client.request(method, format!("{}{path}", server.base));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request.body(body.to_owned());
        }
        request.send()
    };
    let body = lead("ada").to_string();
    let json_type = ("content-type", "application/json");

    // DNS rebinding: a name the server does not answer to, on every kind of request.
    for path in ["/leads", "/health/live", "/openapi.json"] {
        let refused = send(
            Method::GET,
            path,
            &[("host", "attacker.example:8080")],
            None,
        )
        .await
        .unwrap();
        assert_eq!(refused.status(), 421, "{path}");
        assert_eq!(
            refused.headers()["content-type"],
            "application/problem+json"
        );
        let problem: Value = refused.json().await.unwrap();
        assert_eq!(problem["code"], "unknown-host");
    }
    for host in [
        "localhost",
        &address(&server),
        "crm.internal:443",
        "CRM.internal",
    ] {
        let answer = send(Method::GET, "/health/live", &[("host", host)], None)
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "{host}");
    }

    // A state change from another origin: refused, whatever the route.
    for (path, payload) in [
        ("/leads", Some(body.as_str())),
        ("/admin/projections/lead_board/rebuild", None),
    ] {
        let refused = send(
            Method::POST,
            path,
            &[json_type, ("origin", "http://evil.example")],
            payload,
        )
        .await
        .unwrap();
        assert_eq!(refused.status(), 403, "{path}");
        let problem: Value = refused.json().await.unwrap();
        assert_eq!(problem["code"], "cross-origin", "{problem}");
    }
    let null_origin = send(
        Method::POST,
        "/leads",
        &[json_type, ("origin", "null")],
        Some(&body),
    )
    .await
    .unwrap();
    assert_eq!(null_origin.status(), 403);

    // A body not declared JSON (a no-CORS fetch of a Blob sends no type at all).
    for headers in [&[][..], &[("content-type", "text/plain")][..]] {
        let refused = send(Method::POST, "/leads", headers, Some(&body))
            .await
            .unwrap();
        assert_eq!(refused.status(), 415, "{headers:?}");
        let problem: Value = refused.json().await.unwrap();
        assert_eq!(problem["code"], "unsupported-media-type");
    }
    let leads = server.read("/leads").await;
    assert_eq!(
        leads["items"],
        json!([]),
        "a refused request stored something"
    );

    // The server's own pages and the configured origin may; so may a client that is no
    // browser (no Origin).
    let own = server.base.clone();
    for origin in [own.as_str(), "https://crm.example.com"] {
        let accepted = send(
            Method::POST,
            "/leads",
            &[json_type, ("origin", origin)],
            Some(&lead(&format!("o{}", origin.len())).to_string()),
        )
        .await
        .unwrap();
        assert_eq!(accepted.status(), 201, "{origin}");
    }
    assert_eq!(server.post("/leads", lead("bea")).await.status, 201);
    // A read from another origin is answered (the browser keeps it from the page).
    let read = send(
        Method::GET,
        "/leads",
        &[("origin", "http://evil.example")],
        None,
    )
    .await
    .unwrap();
    assert_eq!(read.status(), 200);
}

/// Item 6: No `--help` shows a secret the environment holds, and the server's log shows its
/// database URL with the password masked.
#[test]
fn no_help_shows_a_secret_and_the_log_masks_the_password() {
    let secrets = [
        (
            "ANNALS_DATABASE_URL",
            "postgres://annals:hunter2@db.internal/annals",
        ),
        ("ANNALS_API_TOKENS", "writer:w:tokensecret"),
        ("ANNALS_MASTER_KEY", MASTER_KEY),
    ];
    let help = |path: &[String]| {
        let output = annals()
            .args(path)
            .arg("--help")
            .envs(secrets.iter().copied())
            .output()
            .unwrap();
        assert!(output.status.success(), "{path:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    // Every subcommand, found from the help itself.
    let mut pending: Vec<Vec<String>> = vec![vec![]];
    let mut seen = 0;
    while let Some(path) = pending.pop() {
        let text = help(&path);
        seen += 1;
        for (_, secret) in &secrets {
            assert!(
                !text.contains(secret),
                "annals {path:?} --help shows {secret}:\n{text}"
            );
        }
        assert!(!text.contains("hunter2"), "{path:?}:\n{text}");
        let mut in_commands = false;
        for line in text.lines() {
            if line.starts_with("Commands:") {
                in_commands = true;
                continue;
            }
            if in_commands {
                let Some(name) = line.split_whitespace().next() else {
                    in_commands = false;
                    continue;
                };
                if !line.starts_with("  ") {
                    in_commands = false;
                } else if name != "help" {
                    let mut sub = path.clone();
                    sub.push(name.to_owned());
                    pending.push(sub);
                }
            }
        }
    }
    assert!(seen > 10, "only {seen} helps read");
}

/// Item 6: The server logs the database it opened, with the password masked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_log_masks_the_database_password() {
    let fixture = crate::database::Fixture::new(crate::database::Backend::Postgres).await;
    // Trust authentication: the password is sent and not checked.
    let url = fixture
        .url()
        .replacen("postgres://postgres@", "postgres://postgres:hunter2@", 1);
    assert!(url.contains("hunter2"), "{url}");
    let server = Server::start(&url);
    let logs = server.logs();
    assert!(logs.contains("postgres://postgres:***@"), "{logs}");
    assert!(!logs.contains("hunter2"), "{logs}");
}

/// Item 7: Two tokens never share a principal: an unnamed token is named after its role, and
/// a second token of that name is refused at start with a message saying so.
#[test]
fn two_tokens_never_share_a_principal() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("tokens.db").display());
    for tokens in [
        "writer:w-one,writer:w-two",
        "writer:w-one,writer:writer:w-two",
        "writer:crm:w-one,operator:crm:o-one",
    ] {
        let mut serve = annals()
            .args(["serve", "--database-url", &url, "--listen", "127.0.0.1:0"])
            .env("ANNALS_API_TOKENS", tokens)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        let status = loop {
            if let Some(status) = serve.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > Duration::from_secs(20) {
                let _ = serve.kill();
                panic!("{tokens}: the server started with two tokens of one name");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(!status.success(), "{tokens}");
        let mut stderr = String::new();
        serve
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert!(
            stderr.contains("give each token a name of its own"),
            "{stderr}"
        );
    }
}

/// Item 8: The SQLite database and its `-wal` and `-shm` files are readable by their owner
/// only, as the key file beside them.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_database_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let server = anonymous(&dir, &[]);
    server.command("/leads", lead("ada")).await;
    for file in ["edge.db", "edge.db-wal", "edge.db-shm"] {
        let mode = std::fs::metadata(dir.path().join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file} is {:o}", mode & 0o777);
    }
}

/// Item 10: A path segment that is not UTF-8 is refused as a problem, as every refusal is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_that_is_not_utf8_is_refused_as_a_problem() {
    let dir = tempfile::tempdir().unwrap();
    let server = anonymous(&dir, &[]);
    for (method, path) in [
        (Method::POST, "/admin/projections/%FF/rebuild"),
        (Method::POST, "/admin/projections/%FF/verify"),
        (Method::GET, "/streams/%FF/events"),
        (Method::GET, "/admin/consumers/%FF/parked"),
        (Method::POST, "/admin/consumers/%FF/parked/1/retry"),
        (Method::GET, "/leads/%FF"),
    ] {
        let answer = server.call(method.clone(), path, None, None, &[]).await;
        assert!(answer.status >= 400, "{method} {path}");
        assert_eq!(
            answer.header("content-type"),
            Some("application/problem+json"),
            "{method} {path}: {}",
            answer.status
        );
        assert!(answer.body["code"].is_string(), "{method} {path}");
    }
}

/// Item 11: A retry that spells the id in capitals is the same request: it gets the first
/// answer, and nothing is appended twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_retry_spelling_the_id_in_capitals_is_the_same_request() {
    let dir = tempfile::tempdir().unwrap();
    let server = anonymous(&dir, &[]);
    let id = server.command("/leads", lead("ada")).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let signal = json!({"kind": "demo_request"});
    let key = [("idempotency-key", "signal-1")];
    let first = server
        .call(
            Method::POST,
            &format!("/leads/{id}/signals"),
            None,
            Some(&signal),
            &key,
        )
        .await;
    assert_eq!(first.status, 200, "{}", first.body);
    let retry = server
        .call(
            Method::POST,
            &format!("/leads/{}/signals", id.to_uppercase()),
            None,
            Some(&signal),
            &key,
        )
        .await;
    assert_eq!((retry.status, &retry.body), (200, &first.body));
    let history = server.read(&format!("/leads/{id}/history")).await;
    assert_eq!(history["version"], first.body["version"]);
}

/// Item 12: No answer may be sniffed into another type, and none may be cached: the lead,
/// the list, the personal data and a refusal alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_is_nosniff_and_none_that_names_a_person_is_cached() {
    let dir = tempfile::tempdir().unwrap();
    let server = anonymous(&dir, &[]);
    let id = server.command("/leads", lead("ada")).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for path in [
        format!("/leads/{id}?min_position=1"),
        "/leads?min_position=1".to_owned(),
        format!("/leads/{id}/personal-data"),
        format!("/leads/{id}/history"),
        "/leads/not-an-id".to_owned(),
        "/health/live".to_owned(),
    ] {
        let answer = server.get(&path).await;
        assert_eq!(
            answer.header("x-content-type-options"),
            Some("nosniff"),
            "{path}"
        );
        assert_eq!(answer.header("cache-control"), Some("no-store"), "{path}");
    }
    let personal = server.get(&format!("/leads/{id}/personal-data")).await;
    assert!(
        personal.body.to_string().contains("ada"),
        "{}",
        personal.body
    );
}

/// Item 13: The master key written beside a database in a checkout is ignored by git: one
/// `git add .` does not commit it.
#[test]
fn the_master_key_file_is_ignored_by_git() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for file in [
        "annals.db.key",
        "annals.db",
        "annals.db-wal",
        "annals.db-shm",
    ] {
        let ignored = std::process::Command::new("git")
            .current_dir(&root)
            .args(["check-ignore", "--quiet", "--no-index", file])
            .status()
            .unwrap();
        assert!(ignored.success(), "{file} is not ignored by .gitignore");
    }
}
