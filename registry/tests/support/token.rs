//! A small token service for distribution's `auth.token` mode: checks Basic
//! credentials, and issues ES256 JWTs whose `kid` is the libtrust key id of a key
//! whose certificate is the registry's `rootcertbundle`.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use ring::{
    rand::SystemRandom,
    signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair},
};
use sha2::{Digest as _, Sha256};
use tokio::{io::AsyncWriteExt, net::TcpListener, task::JoinHandle};

use super::http::{read_request, response};

pub const SERVICE: &str = "lazysnap-test-registry";
pub const ISSUER: &str = "lazysnap-test-issuer";

pub struct TokenServer {
    pub port: u16,
    pub cert_pem: String,
    pub requests: Arc<AtomicUsize>,
    pub scopes: Arc<Mutex<Vec<String>>>,
    signer: Arc<Signer>,
    task: JoinHandle<()>,
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Signer {
    key: EcdsaKeyPair,
    kid: String,
    user: String,
    password: String,
}

fn b64url(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// libtrust's key id: base32 of the first 30 bytes of sha256(SPKI DER), in groups of 4.
fn libtrust_kid(spki_der: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let hash = Sha256::digest(spki_der);
    let bytes = &hash[..30];
    let mut bits = 0u32;
    let mut nbits = 0;
    let mut out = String::new();
    for &b in bytes {
        bits = (bits << 8) | u32::from(b);
        nbits += 8;
        while nbits >= 5 {
            nbits -= 5;
            out.push(ALPHABET[((bits >> nbits) & 31) as usize] as char);
        }
    }
    let chunks: Vec<String> = out
        .as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    chunks.join(":")
}

impl Signer {
    fn token(&self, scope: &str) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut access = Vec::new();
        for s in scope.split(' ').filter(|s| !s.is_empty()) {
            let mut parts = s.splitn(3, ':');
            let (Some(typ), Some(name), Some(actions)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let actions: Vec<String> = actions.split(',').map(|a| format!("\"{a}\"")).collect();
            access.push(format!(
                r#"{{"type":"{typ}","name":"{name}","actions":[{}]}}"#,
                actions.join(",")
            ));
        }
        let header = format!(r#"{{"typ":"JWT","alg":"ES256","kid":"{}"}}"#, self.kid);
        let claims = format!(
            r#"{{"iss":"{ISSUER}","sub":"{}","aud":"{SERVICE}","exp":{},"nbf":{},"iat":{},"jti":"{}","access":[{}]}}"#,
            self.user,
            now + 300,
            now.saturating_sub(10),
            now,
            fastrand::u64(..),
            access.join(",")
        );
        let signing_input = format!(
            "{}.{}",
            b64url(header.as_bytes()),
            b64url(claims.as_bytes())
        );
        let sig = self
            .key
            .sign(&SystemRandom::new(), signing_input.as_bytes())
            .expect("sign");
        format!("{signing_input}.{}", b64url(sig.as_ref()))
    }
}

impl TokenServer {
    pub async fn start(user: &str, password: &str) -> TokenServer {
        let rng = SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("keygen");
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .expect("key");
        let rc_key = rcgen::KeyPair::try_from(pkcs8.as_ref()).expect("rcgen key");
        let mut params =
            rcgen::CertificateParams::new(vec!["token-signer".to_string()]).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "token-signer");
        let cert = params.self_signed(&rc_key).expect("token cert");
        use rcgen::PublicKeyData;
        let kid = libtrust_kid(&rc_key.subject_public_key_info());
        let signer = Arc::new(Signer {
            key,
            kid,
            user: user.to_string(),
            password: password.to_string(),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let requests = Arc::new(AtomicUsize::new(0));
        let scopes = Arc::new(Mutex::new(Vec::new()));
        let (s2, r2, sc2) = (signer.clone(), requests.clone(), scopes.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let (signer, requests, scopes) = (s2.clone(), r2.clone(), sc2.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    while let Some(req) = read_request(&mut stream, &mut buf).await {
                        requests.fetch_add(1, Ordering::SeqCst);
                        let expected = format!(
                            "Basic {}",
                            base64::engine::general_purpose::STANDARD
                                .encode(format!("{}:{}", signer.user, signer.password))
                        );
                        let out = if req.header("authorization") != Some(expected.as_str()) {
                            response(
                                401,
                                "Unauthorized",
                                &[],
                                b"{\"details\":\"bad credentials\"}",
                            )
                        } else {
                            // several scopes (a push that mounts) arrive as
                            // repeated parameters; the token grants them all
                            let scope = req.query_all("scope").join(" ");
                            scopes.lock().expect("lock").push(scope.clone());
                            let body = format!(
                                r#"{{"token":"{}","expires_in":300}}"#,
                                signer.token(&scope)
                            );
                            response(
                                200,
                                "OK",
                                &[("Content-Type", "application/json".into())],
                                body.as_bytes(),
                            )
                        };
                        if stream.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        TokenServer {
            port,
            cert_pem: cert.pem(),
            requests,
            scopes,
            signer,
            task,
        }
    }

    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// A token service for `user`/`password` and a registry that trusts it.
    pub async fn with_registry(
        user: &str,
        password: &str,
    ) -> (TokenServer, super::registry::Registry) {
        let tokens = TokenServer::start(user, password).await;
        let registry = super::registry::Registry::start(
            super::registry::Auth::Token {
                realm: tokens.realm(),
                service: SERVICE.into(),
                issuer: ISSUER.into(),
                root_cert_pem: tokens.cert_pem.clone(),
            },
            None,
        );
        (tokens, registry)
    }

    /// A token for pushing test content.
    pub fn mint(&self, scope: &str) -> String {
        self.signer.token(scope)
    }
}
