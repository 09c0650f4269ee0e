//! Mutual TLS between a server and clients from the same and from other CAs, on loopback.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use ferry_pki::client::Error as ClientError;
use ferry_pki::{Client, Kind, PeerIdentity, ServeOptions};
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

/// A scratch directory with two CAs and identities from each.
struct Pki {
    root: PathBuf,
}

impl Pki {
    fn new(test: &str) -> Pki {
        let root = std::env::temp_dir().join(format!("ferry-pki-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for ca in ["ca", "ca2"] {
            ferry_pki::init_ca(&root.join(ca)).expect("ca init");
        }
        ferry_pki::issue_host(&root.join("ca"), "host-a", &[], &root.join("host-a")).expect("host");
        ferry_pki::issue_client(&root.join("ca"), "admin", &root.join("admin")).expect("client");
        ferry_pki::issue_host(&root.join("ca2"), "intruder-host", &[], &root.join("host-x")).expect("host2");
        ferry_pki::issue_client(&root.join("ca2"), "intruder", &root.join("client-x")).expect("client2");
        Pki { root }
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A running test server: its port, how many requests reached a handler, its stop.
struct Server {
    port: u16,
    handled: Arc<AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(identity: &Path, options: ServeOptions) -> Server {
        Server::start_on(identity, options, 0).await
    }

    /// On loopback port `port` (0: any).
    async fn start_on(identity: &Path, options: ServeOptions, port: u16) -> Server {
        let handled = Arc::new(AtomicUsize::new(0));
        let count = handled.clone();
        let count2 = handled.clone();
        let router =
            Router::new()
                .route(
                    "/whoami",
                    get(move |Extension(peer): Extension<PeerIdentity>| async move {
                        count.fetch_add(1, Ordering::SeqCst);
                        Json(peer)
                    }),
                )
                .route(
                    "/port",
                    get(
                        |axum::extract::ConnectInfo(addr): axum::extract::ConnectInfo<
                            std::net::SocketAddr,
                        >| async move { addr.port().to_string() },
                    ),
                )
                .route(
                    "/addr",
                    get(
                        |axum::extract::ConnectInfo(addr): axum::extract::ConnectInfo<
                            std::net::SocketAddr,
                        >| async move { addr.ip().to_string() },
                    ),
                )
                .route(
                    "/echo",
                    post(move |Json(body): Json<Value>| async move {
                        count2.fetch_add(1, Ordering::SeqCst);
                        Json(json!({ "echo": body }))
                    }),
                );
        let config = Arc::new(ferry_pki::server_config(identity).expect("server config"));
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(ferry_pki::serve_tls_with(
            listener,
            config,
            router,
            async move {
                let _ = stopped.await;
            },
            options,
        ));
        Server { port, handled, stop: Some(stop), task }
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    fn handled(&self) -> usize {
        self.handled.load(Ordering::SeqCst)
    }

    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("server stops")
            .expect("server task");
    }
}

fn client(dir: &Path) -> Client {
    Client::new(dir).expect("client").with_timeouts(Duration::from_secs(10), Duration::from_secs(20))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_ca_talk_and_handlers_see_the_peer() {
    let pki = Pki::new("talk");
    let server = Server::start(&pki.dir("host-a"), ServeOptions::default()).await;

    let admin = client(&pki.dir("admin"));
    let me = admin.get_json(&server.url("/whoami")).await.expect("whoami");
    assert_eq!(me, json!({ "name": "admin", "kind": "client" }));
    let echoed = admin.post(&server.url("/echo"), &json!({ "x": [1, 2] })).await.expect("echo");
    assert_eq!(echoed.status, 200);
    assert_eq!(echoed.peer, Some(PeerIdentity { name: "host-a".into(), kind: Kind::Host }));
    assert_eq!(echoed.json().expect("json"), json!({ "echo": { "x": [1, 2] } }));
    let addr = admin.get(&server.url("/addr")).await.expect("addr");
    assert_eq!(&addr.body[..], b"127.0.0.1");
    let missing = admin.get(&server.url("/nope")).await.expect("404 is a response");
    assert_eq!(missing.status, 404);
    assert!(matches!(missing.error_for_status(), Err(ClientError::Status { status: 404, .. })));

    // A host calling another host is seen as a host; by name and over IPv4 loopback.
    let host = client(&pki.dir("host-a"));
    let url = format!("https://localhost:{}/whoami", server.port);
    let peer: PeerIdentity =
        serde_json::from_value(host.get_json(&url).await.expect("host whoami")).expect("identity");
    assert_eq!(peer, PeerIdentity { name: "host-a".into(), kind: Kind::Host });
    assert_eq!(server.handled(), 3);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_from_another_ca_is_refused_at_the_handshake() {
    let pki = Pki::new("otherca");
    let server = Server::start(&pki.dir("host-a"), ServeOptions::default()).await;
    // The intruder trusts our CA (it has our ca.pem) but its own certificate is from ca2.
    std::fs::copy(pki.dir("ca").join("ca.pem"), pki.dir("client-x").join("ca.pem.ours")).expect("copy");
    std::fs::rename(pki.dir("client-x").join("ca.pem.ours"), pki.dir("client-x").join("ca.pem"))
        .expect("rename");
    let intruder = client(&pki.dir("client-x"));
    for _ in 0..3 {
        let err = intruder.get(&server.url("/whoami")).await.expect_err("refused");
        assert!(matches!(err, ClientError::Tls { .. }), "{err:?}");
        let err = intruder.post(&server.url("/echo"), &json!(1)).await.expect_err("refused");
        assert!(matches!(err, ClientError::Tls { .. }), "{err:?}");
    }
    assert_eq!(server.handled(), 0, "a handler ran for a refused peer");
    // The server still serves its own clients.
    client(&pki.dir("admin")).get_json(&server.url("/whoami")).await.expect("admin");
    assert_eq!(server.handled(), 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_certificate_is_refused() {
    let pki = Pki::new("nocert");
    let server = Server::start(&pki.dir("host-a"), ServeOptions::default()).await;
    let roots = ferry_pki::tls::roots(&pki.dir("admin")).expect("roots");
    let config = rustls::ClientConfig::builder_with_provider(ferry_pki::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let anonymous =
        Client::from_config(Arc::new(config)).with_timeouts(Duration::from_secs(10), Duration::from_secs(20));
    let err = anonymous.get(&server.url("/whoami")).await.expect_err("refused");
    assert!(matches!(err, ClientError::Tls { .. }), "{err:?}");
    assert_eq!(server.handled(), 0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_from_another_ca_is_refused_by_the_client() {
    let pki = Pki::new("otherserver");
    let server = Server::start(&pki.dir("host-x"), ServeOptions::default()).await;
    let err = client(&pki.dir("admin")).get(&server.url("/whoami")).await.expect_err("refused");
    match &err {
        ClientError::Tls { source: rustls::Error::InvalidCertificate(e), .. } => {
            assert_eq!(*e, rustls::CertificateError::UnknownIssuer, "{err:?}")
        }
        other => panic!("expected an unknown-issuer TLS error, got {other:?}"),
    }
    assert_eq!(server.handled(), 0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_cannot_serve() {
    let pki = Pki::new("clientserves");
    // A client certificate lacks the serverAuth usage: clients refuse it as a server.
    let server = Server::start(&pki.dir("admin"), ServeOptions::default()).await;
    let err = client(&pki.dir("host-a")).get(&server.url("/whoami")).await.expect_err("refused");
    assert!(matches!(err, ClientError::Tls { .. }), "{err:?}");
    assert_eq!(server.handled(), 0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_handshake_does_not_block_others() {
    let pki = Pki::new("stall");
    // Long enough for one real handshake on a loaded machine, short for the test's length.
    let timeout = Duration::from_secs(3);
    let options = ServeOptions { handshake_timeout: timeout, ..ServeOptions::default() };
    let server = Server::start(&pki.dir("host-a"), options).await;
    // One peer connects and says nothing; another sends half a ClientHello.
    let mut silent = tokio::net::TcpStream::connect(("127.0.0.1", server.port)).await.expect("connect");
    let mut partial = tokio::net::TcpStream::connect(("127.0.0.1", server.port)).await.expect("connect");
    tokio::io::AsyncWriteExt::write_all(&mut partial, &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .expect("write");

    let start = Instant::now();
    let me = client(&pki.dir("admin")).get_json(&server.url("/whoami")).await.expect("served");
    assert_eq!(me["name"], "admin");
    assert!(start.elapsed() < timeout, "served only after {:?}", start.elapsed());

    // The stalled peers are dropped once the handshake timeout passes.
    for stream in [&mut silent, &mut partial] {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(timeout * 3, stream.read(&mut buf)).await.expect("closed in time");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    assert_eq!(server.handled(), 1);
    server.shutdown().await;
}

/// The client's port of the connection a request came on.
async fn client_port(client: &Client, server: &Server) -> String {
    let r = client.get(&server.url("/port")).await.expect("port");
    String::from_utf8_lossy(&r.body).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_connections_are_reused_expire_and_reconnect() {
    let pki = Pki::new("keepalive");
    let server = Server::start(&pki.dir("host-a"), ServeOptions::default()).await;
    let kept = client(&pki.dir("host-a")).with_keep_alive(Duration::from_millis(500));
    let first = client_port(&kept, &server).await;
    // The same connection, also for a clone (the daemon clones its client per peer call).
    assert_eq!(client_port(&kept, &server).await, first);
    assert_eq!(client_port(&kept.clone(), &server).await, first);
    let echoed = kept.post(&server.url("/echo"), &json!({ "n": 1 })).await.expect("echo");
    assert_eq!(echoed.peer, Some(PeerIdentity { name: "host-a".into(), kind: Kind::Host }));
    assert_eq!(echoed.json().expect("json"), json!({ "echo": { "n": 1 } }));
    assert_eq!(client_port(&kept, &server).await, first);
    // Without keep-alive, a new connection each time.
    let plain = client(&pki.dir("host-a"));
    assert_ne!(client_port(&plain, &server).await, client_port(&plain, &server).await);
    // Idle beyond its bound: a new connection.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let second = client_port(&kept, &server).await;
    assert_ne!(second, first);
    // The server restarts (its connections closed): the next request, a POST, goes on a
    // new connection without an error.
    let port = server.port;
    server.shutdown().await;
    let server = Server::start_on(&pki.dir("host-a"), ServeOptions::default(), port).await;
    let echoed = kept.post(&server.url("/echo"), &json!({ "n": 2 })).await.expect("echo after restart");
    assert_eq!(echoed.json().expect("json"), json!({ "echo": { "n": 2 } }));
    assert_eq!(server.handled(), 1, "the POST reached the new server once");
    assert_ne!(client_port(&kept, &server).await, second);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_accepting() {
    let pki = Pki::new("shutdown");
    let server = Server::start(&pki.dir("host-a"), ServeOptions::default()).await;
    let admin = client(&pki.dir("admin"));
    admin.get_json(&server.url("/whoami")).await.expect("before");
    let url = server.url("/whoami");
    server.shutdown().await;
    let err = admin.get(&url).await.expect_err("after shutdown");
    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
}

#[test]
fn blocking_client_works_outside_a_runtime() {
    let pki = Pki::new("blocking");
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("rt");
    let server = runtime.block_on(Server::start(&pki.dir("host-a"), ServeOptions::default()));
    let blocking = ferry_pki::BlockingClient::new(&pki.dir("admin")).expect("blocking client");
    let me = blocking.get_json(&server.url("/whoami")).expect("whoami");
    assert_eq!(me["kind"], "client");
    let r = blocking.put(&server.url("/echo"), &json!(null)).expect("put");
    assert_eq!(r.status, 405);
    runtime.block_on(server.shutdown());
}

#[test]
fn files_and_modes() {
    let pki = Pki::new("files");
    let mode = |p: PathBuf| std::fs::metadata(&p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(pki.dir("ca").join("ca.key")), 0o600);
    // Certificates are public: 0644 less the umask.
    assert_eq!(mode(pki.dir("ca").join("ca.pem")) & 0o733, 0o600);
    for id in ["host-a", "admin"] {
        assert_eq!(mode(pki.dir(id).join("key.pem")), 0o600, "{id}");
        assert_eq!(mode(pki.dir(id).join("cert.pem")) & 0o733, 0o600, "{id}");
        assert_eq!(mode(pki.dir(id)), 0o700, "{id}");
        assert_eq!(
            std::fs::read(pki.dir(id).join("ca.pem")).expect("copy"),
            std::fs::read(pki.dir("ca").join("ca.pem")).expect("ca")
        );
    }

    // ca init refuses to overwrite and changes nothing.
    let key_before = std::fs::read(pki.dir("ca").join("ca.key")).expect("key");
    let err = ferry_pki::init_ca(&pki.dir("ca")).expect_err("overwrite");
    assert!(err.to_string().contains("already exists"), "{err}");
    assert_eq!(std::fs::read(pki.dir("ca").join("ca.key")).expect("key"), key_before);
    // Only one of the two files there: still refused, nothing written.
    std::fs::create_dir_all(pki.dir("half")).expect("mkdir");
    std::fs::write(pki.dir("half").join("ca.pem"), "x").expect("write");
    ferry_pki::init_ca(&pki.dir("half")).expect_err("half");
    assert!(!pki.dir("half").join("ca.key").exists());

    // issue refuses to overwrite an identity.
    ferry_pki::issue_client(&pki.dir("ca"), "admin", &pki.dir("admin")).expect_err("overwrite identity");
    // A CA key that is not the CA certificate's is refused.
    std::fs::create_dir_all(pki.dir("mixed")).expect("mkdir");
    std::fs::copy(pki.dir("ca").join("ca.pem"), pki.dir("mixed").join("ca.pem")).expect("copy");
    std::fs::copy(pki.dir("ca2").join("ca.key"), pki.dir("mixed").join("ca.key")).expect("copy");
    let err = ferry_pki::issue_client(&pki.dir("mixed"), "x", &pki.dir("x")).expect_err("mismatch");
    assert!(matches!(err, ferry_pki::ca::Error::KeyMismatch { .. }), "{err:?}");
    assert!(!pki.dir("x").join("key.pem").exists());
    // A missing CA is an error naming the file.
    let err = ferry_pki::issue_client(&pki.dir("nowhere"), "x", &pki.dir("y")).expect_err("no ca");
    assert!(err.to_string().contains("nowhere"), "{err}");
}

#[test]
fn exposed_keys_are_refused() {
    let pki = Pki::new("exposed");
    let key = pki.dir("host-a").join("key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let err = ferry_pki::server_config(&pki.dir("host-a")).expect_err("exposed key");
    assert!(err.to_string().contains("readable by other users"), "{err}");
    let ca_key = pki.dir("ca").join("ca.key");
    std::fs::set_permissions(&ca_key, std::fs::Permissions::from_mode(0o604)).expect("chmod");
    let err = ferry_pki::issue_client(&pki.dir("ca"), "late", &pki.dir("late")).expect_err("exposed CA key");
    assert!(err.to_string().contains("readable by other users"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_a_request_in_flight_finish() {
    let pki = Pki::new("drain");
    let router = Router::new().route(
        "/slow",
        get(|| async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            "done"
        }),
    );
    let config = Arc::new(ferry_pki::server_config(&pki.dir("host-a")).expect("config"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(ferry_pki::serve_tls(listener, config, router, async move {
        let _ = stopped.await;
    }));
    let admin = client(&pki.dir("admin"));
    let url = format!("https://127.0.0.1:{port}/slow");
    let request = tokio::spawn(async move { admin.get(&url).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let _ = stop.send(());
    let response = request.await.expect("task").expect("request in flight completes");
    assert_eq!((response.status, &response.body[..]), (200, &b"done"[..]));
    tokio::time::timeout(Duration::from_secs(5), server).await.expect("server stops").expect("server task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_only_routes_refuse_clients() {
    let pki = Pki::new("hostonly");
    let router = Router::new()
        .route("/reserve", post(|Extension(peer): Extension<PeerIdentity>| async move { peer.name }))
        .route_layer(axum::middleware::from_fn(ferry_pki::require_host));
    let config = Arc::new(ferry_pki::server_config(&pki.dir("host-a")).expect("config"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(ferry_pki::serve_tls(listener, config, router, async move {
        let _ = stopped.await;
    }));
    let url = format!("https://127.0.0.1:{port}/reserve");
    let by_host = client(&pki.dir("host-a")).post(&url, &json!({})).await.expect("host");
    assert_eq!((by_host.status, &by_host.body[..]), (200, &b"host-a"[..]));
    let by_client = client(&pki.dir("admin")).post(&url, &json!({})).await.expect("client");
    assert_eq!(by_client.status, 403);
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(5), server).await.expect("server stops").expect("server task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_times_out() {
    let pki = Pki::new("silentserver");
    // Accepts TCP connections and never speaks.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let quick = Client::new(&pki.dir("admin"))
        .expect("client")
        .with_timeouts(Duration::from_millis(300), Duration::from_secs(1));
    let start = Instant::now();
    let err = quick.get(&format!("https://127.0.0.1:{port}/whoami")).await.expect_err("times out");
    assert!(matches!(err, ClientError::Timeout { step: "TLS handshake", .. }), "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    hold.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_closed() {
    let pki = Pki::new("limit");
    let options = ServeOptions {
        max_connections: 1,
        handshake_timeout: Duration::from_secs(3),
        ..ServeOptions::default()
    };
    let server = Server::start(&pki.dir("host-a"), options).await;
    let _hog = tokio::net::TcpStream::connect(("127.0.0.1", server.port)).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let err = client(&pki.dir("admin")).get(&server.url("/whoami")).await.expect_err("over the limit");
    assert!(matches!(err, ClientError::Tls { .. } | ClientError::Http { .. }), "{err:?}");
    assert_eq!(server.handled(), 0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_loopback_is_a_host_name_too() {
    let pki = Pki::new("ipv6");
    let router = Router::new().route("/", get(|| async { "v6" }));
    let config = Arc::new(ferry_pki::server_config(&pki.dir("host-a")).expect("config"));
    let listener = tokio::net::TcpListener::bind("[::1]:0").await.expect("bind ::1");
    let port = listener.local_addr().expect("addr").port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(ferry_pki::serve_tls(listener, config, router, async move {
        let _ = stopped.await;
    }));
    let r = client(&pki.dir("admin")).get(&format!("https://[::1]:{port}/")).await.expect("over ::1");
    assert_eq!((r.status, &r.body[..], r.addr.as_str()), (200, &b"v6"[..], format!("[::1]:{port}").as_str()));
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(5), server).await.expect("server stops").expect("server task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_certificate_without_the_dialled_address_is_refused() {
    let pki = Pki::new("wrongname");
    let request = ferry_pki::IssueRequest {
        name: "elsewhere".into(),
        kind: Kind::Host,
        sans: vec!["elsewhere.example".into()],
    };
    ferry_pki::issue(&pki.dir("ca"), &request, &pki.dir("elsewhere")).expect("issue");
    let server = Server::start(&pki.dir("elsewhere"), ServeOptions::default()).await;
    let err = client(&pki.dir("admin")).get(&server.url("/whoami")).await.expect_err("wrong name");
    match &err {
        ClientError::Tls { source: rustls::Error::InvalidCertificate(e), .. } => {
            assert!(matches!(e, rustls::CertificateError::NotValidForNameContext { .. }), "{e:?}")
        }
        other => panic!("expected a name mismatch, got {other:?}"),
    }
    assert_eq!(server.handled(), 0);
    server.shutdown().await;
}
