//! The real `annals serve`, started on port 0 against a test database, and a client that
//! speaks to it as the role it is asked to.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};

/// Three tokens, one per role, each with a name (the events' actor).
pub const TOKENS: &str =
    "writer:wendy:writer-token,analyst:andy:analyst-token,operator:olga:operator-token";

pub const WRITER: Option<&str> = Some("writer-token");
pub const ANALYST: Option<&str> = Some("analyst-token");
pub const OPERATOR: Option<&str> = Some("operator-token");

/// The master key every test server of a database shares (PostgreSQL needs one; a test
/// of the key file beside a SQLite database removes it).
pub const MASTER_KEY: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00112233445566778899aabbccddeeff0";

pub fn annals() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_annals"));
    for variable in [
        "ANNALS_API_TOKENS",
        "ANNALS_DATABASE_URL",
        "ANNALS_LISTEN",
        "ANNALS_LOG_FORMAT",
        "ANNALS_CONSISTENCY_WAIT_MS",
        "ANNALS_REQUEST_TIMEOUT_MS",
        "ANNALS_MASTER_KEY_FILE",
        "ANNALS_ALLOWED_HOSTS",
        "ANNALS_ALLOWED_ORIGINS",
        "ANNALS_HEADER_READ_TIMEOUT",
        "ANNALS_MAX_CONNECTIONS",
        "ANNALS_SHUTDOWN_GRACE",
    ] {
        command.env_remove(variable);
    }
    command.env("RUST_LOG", "info,sqlx=warn");
    command.env("ANNALS_MASTER_KEY", MASTER_KEY);
    command
}

#[derive(Debug)]
pub struct Server {
    child: Mutex<Child>,
    pub base: String,
    logs: Arc<Mutex<String>>,
    client: reqwest::Client,
}

/// An answer: status, headers, and the body as JSON (`Null` when it is not JSON).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The problem's `code`, for error answers.
    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }
}

impl Server {
    /// Serves the database with the three role tokens.
    pub fn start(url: &str) -> Server {
        Server::start_with(url, &[("ANNALS_API_TOKENS", TOKENS)])
    }

    pub fn start_with(url: &str, env: &[(&str, &str)]) -> Server {
        let mut command = annals();
        command
            .args(["serve", "--database-url", url, "--listen", "127.0.0.1:0"])
            .envs(env.iter().copied());
        Server::start_command(&mut command)
    }

    /// Serves with a `serve` command made by the test (`annals()` and its settings).
    pub fn start_command(command: &mut Command) -> Server {
        command.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = command.spawn().expect("the annals binary starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let logs = Arc::new(Mutex::new(String::new()));
        let (ready, address) = mpsc::channel();
        let kept = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // Kept before the ready line is told: a test that reads the logs as soon
                // as the server is ready finds that line in them.
                {
                    let mut logs = kept.lock().unwrap();
                    logs.push_str(&line);
                    logs.push('\n');
                }
                if let Some(at) = line.find("listening on http://") {
                    let rest = &line[at + "listening on ".len()..];
                    let url: String = rest
                        .chars()
                        .take_while(|c| !c.is_whitespace() && *c != '"')
                        .collect();
                    let _ = ready.send(url);
                }
            }
        });
        let base = match address.recv_timeout(Duration::from_secs(60)) {
            Ok(base) => base,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "the server did not become ready; its log:\n{}",
                    logs.lock().unwrap()
                );
            }
        };
        Server {
            child: Mutex::new(child),
            base,
            logs,
            client: reqwest::Client::new(),
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap().id()
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// Any request; an error when no answer came (the server is down or the
    /// connection broke).
    pub async fn try_call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<Answer, reqwest::Error> {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base))
            .timeout(Duration::from_secs(30));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await?;
        Ok(Answer {
            status,
            headers,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        })
    }

    /// Any request, with a token (or none), a JSON body and extra headers.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Answer {
        self.try_call(method, path, token, body, headers)
            .await
            .expect("the server answers")
    }

    /// A command, as the writer.
    pub async fn post(&self, path: &str, body: Value) -> Answer {
        self.call(Method::POST, path, WRITER, Some(&body), &[])
            .await
    }

    /// A command that must succeed; its answer's body.
    pub async fn command(&self, path: &str, body: Value) -> Value {
        let answer = self.post(path, body).await;
        assert!(
            matches!(answer.status, 200 | 201),
            "POST {path}: {} {}",
            answer.status,
            answer.body
        );
        answer.body
    }

    /// An operator's action without a body (`/admin/...`).
    pub async fn admin(&self, path: &str) -> Answer {
        self.call(Method::POST, path, OPERATOR, None, &[]).await
    }

    /// A read, as the operator (who may read everything).
    pub async fn get(&self, path: &str) -> Answer {
        self.call(Method::GET, path, OPERATOR, None, &[]).await
    }

    /// A read that must succeed; its answer's body.
    pub async fn read(&self, path: &str) -> Value {
        let answer = self.get(path).await;
        assert_eq!(answer.status, 200, "GET {path}: {}", answer.body);
        answer.body
    }

    /// Kills the process outright (SIGKILL): no shutdown, no flush, nothing finished.
    pub fn kill(&self) {
        let mut child = self.child.lock().unwrap();
        child.kill().expect("kill -9");
        child.wait().expect("reaped");
    }

    /// Pauses the process (SIGSTOP): it holds its connections, its locks and its
    /// leases, and does nothing, until `thaw`.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Lets a frozen process go on (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.lock().unwrap();
        let sent = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill {signal}");
    }

    /// Sends SIGTERM and waits (at most a minute) for the process to exit.
    pub fn terminate(&self) -> ExitStatus {
        let mut child = self.child.lock().unwrap();
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "the server did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(child) = self.child.get_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A lead body with a unique email.
pub fn lead(name: &str) -> Value {
    serde_json::json!({
        "email": format!("{name}.{}@example.com", uuid::Uuid::new_v4().simple()),
        "name": name,
        "company": format!("{name} Industries"),
        "source": "web",
    })
}

/// A won deal of a new account, in EUR; the deal's id.
pub async fn won_deal(server: &Server) -> String {
    let account = server
        .command("/accounts", json!({"name": "Initech"}))
        .await;
    let deal = server
        .command(
            "/deals",
            json!({"account_id": account["id"], "name": "Engines",
                   "amount": {"currency": "EUR", "amount_minor": 100000}}),
        )
        .await;
    let id = deal["id"].as_str().unwrap().to_owned();
    server.command(&format!("/deals/{id}/win"), json!({})).await;
    id
}

/// Captures a lead and brings it to qualified (two demo requests); returns its id.
pub async fn qualified_lead(server: &Server, name: &str) -> String {
    let id = server.command("/leads", lead(name)).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for _ in 0..2 {
        server
            .command(
                &format!("/leads/{id}/signals"),
                serde_json::json!({"kind": "demo_request"}),
            )
            .await;
    }
    id
}

/// A server's log as text, without the terminal's colour codes.
pub fn strip_ansi(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for end in chars.by_ref() {
                if end.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}
