//! Where datasets live: local paths and `file://`, `s3://`, `gs://` and `az://` URLs, all
//! through `object_store`. Credentials come from each cloud's standard environment
//! variables (`AWS_ACCESS_KEY_ID`, `GOOGLE_SERVICE_ACCOUNT`, `AZURE_STORAGE_ACCOUNT_KEY`,
//! ...); an explicit endpoint serves S3-compatible stores. Every remote call is retried
//! with exponential backoff on transient errors, and the final error names the object.

use crate::DataError;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig};
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// How to reach object stores.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageOptions {
    /// Endpoint of an S3-compatible store (e.g. `http://127.0.0.1:8333`); None uses
    /// `AWS_ENDPOINT_URL` or the cloud's default.
    pub endpoint: Option<String>,
    /// Region; None uses `AWS_REGION` or `us-east-1`.
    pub region: Option<String>,
    /// Attempts after the first one for a transient failure.
    pub retries: u32,
    /// Wait before the first retry; doubles on each attempt (capped at 10 s).
    pub backoff: Duration,
}

impl Default for StorageOptions {
    fn default() -> Self {
        Self {
            endpoint: None,
            region: None,
            retries: 8,
            backoff: Duration::from_millis(200),
        }
    }
}

/// The I/O runtime shared by every store client. Two threads: I/O waits, it does not
/// compute (tokenization has its own worker threads).
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("catapult-io")
            .enable_all()
            .build()
            .expect("the I/O runtime starts")
    })
}

/// An object store and a location inside it, with the user's spelling kept for messages.
#[derive(Clone)]
pub struct Location {
    /// The store.
    pub store: Arc<dyn ObjectStore>,
    /// The key (a file or a prefix) inside the store.
    pub key: ObjPath,
    /// What the user wrote, for error messages.
    pub display: String,
    /// Options the store was opened with.
    pub options: StorageOptions,
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Location({})", self.display)
    }
}

impl Location {
    /// Opens `location`: a local path, or a `file://`, `s3://`, `gs://` or `az://` URL.
    pub fn open(location: &str, options: &StorageOptions) -> Result<Self, DataError> {
        let store_err = |reason: String| DataError::Store {
            location: location.to_string(),
            reason,
        };
        // Our own retry loop handles transient errors (with messages that name the
        // object), so the HTTP clients do not retry underneath it.
        let no_retry = RetryConfig {
            max_retries: 0,
            ..RetryConfig::default()
        };
        let client = ClientOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(900));
        let (store, key): (Arc<dyn ObjectStore>, ObjPath) =
            if let Some((scheme, _)) = location.split_once("://") {
                let url = url::Url::parse(location)
                    .map_err(|e| store_err(format!("not a valid URL ({e})")))?;
                let key = ObjPath::from_url_path(url.path())
                    .map_err(|e| store_err(format!("bad object path ({e})")))?;
                let built: Result<Arc<dyn ObjectStore>, object_store::Error> = match scheme {
                    "file" => Ok(Arc::new(LocalFileSystem::new().with_fsync(true))),
                    "s3" | "s3a" => {
                        let mut b = AmazonS3Builder::from_env()
                            .with_url(location)
                            .with_retry(no_retry)
                            .with_client_options(client);
                        if let Some(endpoint) = &options.endpoint {
                            b = b
                                .with_endpoint(endpoint)
                                .with_allow_http(endpoint.starts_with("http://"))
                                .with_virtual_hosted_style_request(false);
                        } else if std::env::var("AWS_ENDPOINT_URL")
                            .is_ok_and(|e| e.starts_with("http://"))
                        {
                            b = b.with_allow_http(true);
                        }
                        if let Some(region) = &options.region {
                            b = b.with_region(region);
                        } else if std::env::var("AWS_REGION").is_err()
                            && std::env::var("AWS_DEFAULT_REGION").is_err()
                        {
                            b = b.with_region("us-east-1");
                        }
                        b.build().map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
                    }
                    "gs" => GoogleCloudStorageBuilder::from_env()
                        .with_url(location)
                        .with_retry(no_retry)
                        .with_client_options(client)
                        .build()
                        .map(|s| Arc::new(s) as Arc<dyn ObjectStore>),
                    "az" | "azure" | "abfs" | "abfss" => MicrosoftAzureBuilder::from_env()
                        .with_url(location)
                        .with_retry(no_retry)
                        .with_client_options(client)
                        .build()
                        .map(|s| Arc::new(s) as Arc<dyn ObjectStore>),
                    other => {
                        return Err(store_err(format!(
                    "unknown scheme `{other}://`; use a local path, file://, s3://, gs:// or az://"
                )))
                    }
                };
                let store = built.map_err(|e| {
                    store_err(format!(
                    "cannot configure the store ({e}); check the credentials in the environment \
                     (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, GOOGLE_SERVICE_ACCOUNT, \
                     AZURE_STORAGE_ACCOUNT_NAME/AZURE_STORAGE_ACCOUNT_KEY)"
                ))
                })?;
                (store, key)
            } else {
                let path = std::path::Path::new(location);
                let absolute = if path.is_absolute() {
                    path.to_path_buf()
                } else {
                    std::env::current_dir()
                        .map_err(|e| store_err(e.to_string()))?
                        .join(path)
                };
                let key = ObjPath::from_absolute_path(&absolute)
                    .map_err(|e| store_err(format!("bad path ({e})")))?;
                // Local writes are fsynced (file and directory) before they return, as
                // for file:// URLs: a checkpoint's manifest never reaches the disk ahead
                // of the shards it lists.
                (Arc::new(LocalFileSystem::new().with_fsync(true)), key)
            };
        Ok(Self {
            store,
            key,
            display: location.trim_end_matches('/').to_string(),
            options: options.clone(),
        })
    }

    /// The location of `name` under this prefix, for messages.
    pub fn display_child(&self, name: &str) -> String {
        format!("{}/{name}", self.display)
    }

    /// The key of `name` under this prefix.
    pub fn child(&self, name: &str) -> ObjPath {
        let mut key = self.key.clone();
        for part in name.split('/') {
            key = key.clone().join(part);
        }
        key
    }

    /// Every object under the prefix (recursively), sorted by key.
    pub fn list(&self) -> Result<Vec<object_store::ObjectMeta>, DataError> {
        let store = self.store.clone();
        let key = self.key.clone();
        let mut objects = retry(&self.options, &self.display, "list", || {
            let store = store.clone();
            let key = key.clone();
            async move { store.list(Some(&key)).try_collect::<Vec<_>>().await }
        })?;
        objects.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(objects)
    }

    /// The whole object `key` (shared, no copy beyond the read), or None if it does not
    /// exist.
    pub fn get_optional(
        &self,
        key: &ObjPath,
        display: &str,
    ) -> Result<Option<bytes::Bytes>, DataError> {
        let store = self.store.clone();
        let result = retry(&self.options, display, "read", || {
            let store = store.clone();
            let key = key.clone();
            async move {
                match store.get(&key).await {
                    Ok(r) => r.bytes().await.map(Some),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(e),
                }
            }
        })?;
        Ok(result)
    }

    /// Metadata of `key`.
    pub fn head(
        &self,
        key: &ObjPath,
        display: &str,
    ) -> Result<object_store::ObjectMeta, DataError> {
        let store = self.store.clone();
        retry(&self.options, display, "stat", || {
            let store = store.clone();
            let key = key.clone();
            async move { store.head(&key).await }
        })
    }

    /// Writes `bytes` to `key` in one request (atomic on every backend: a local write
    /// goes to a temporary file that is renamed).
    pub fn put(&self, key: &ObjPath, display: &str, bytes: Vec<u8>) -> Result<(), DataError> {
        let store = self.store.clone();
        let payload = bytes::Bytes::from(bytes);
        retry(&self.options, display, "write", || {
            let store = store.clone();
            let key = key.clone();
            let payload = payload.clone();
            async move { store.put(&key, payload.into()).await.map(|_| ()) }
        })
    }

    /// Writes the concatenation of `chunks` to `key` in one request, without copying them
    /// into one buffer.
    pub fn put_chunks(
        &self,
        key: &ObjPath,
        display: &str,
        chunks: Vec<bytes::Bytes>,
    ) -> Result<(), DataError> {
        let store = self.store.clone();
        let total: usize = chunks.iter().map(|c| c.len()).sum();
        // Local files take the chunks in one write; object stores get a multipart
        // upload above 64 MiB (single PUTs are capped at 5 GiB on S3).
        let multipart = total > (64 << 20)
            && !self.display.starts_with('/')
            && self.display.contains("://")
            && !self.display.starts_with("file://");
        retry(&self.options, display, "write", || {
            let store = store.clone();
            let key = key.clone();
            let chunks = chunks.clone();
            async move {
                if multipart {
                    let mut upload =
                        object_store::WriteMultipart::new(store.put_multipart(&key).await?);
                    for c in chunks {
                        upload.put(c);
                        upload.wait_for_capacity(4).await?;
                    }
                    upload.finish().await.map(|_| ())
                } else {
                    let payload: object_store::PutPayload = chunks.into_iter().collect();
                    store.put(&key, payload).await.map(|_| ())
                }
            }
        })
    }

    /// Writes `bytes` to `key` only if no object is there (put-if-absent: an exclusive
    /// create locally, a conditional put on object stores). Returns false when the key
    /// already existed.
    pub fn put_if_absent(
        &self,
        key: &ObjPath,
        display: &str,
        bytes: Vec<u8>,
    ) -> Result<bool, DataError> {
        let store = self.store.clone();
        let payload = bytes::Bytes::from(bytes);
        retry(&self.options, display, "write", || {
            let store = store.clone();
            let key = key.clone();
            let payload = payload.clone();
            async move {
                let opts = object_store::PutOptions {
                    mode: object_store::PutMode::Create,
                    ..Default::default()
                };
                match store.put_opts(&key, payload.into(), opts).await {
                    Ok(_) => Ok(true),
                    Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
                    Err(e) => Err(e),
                }
            }
        })
    }

    /// The whole object `key`.
    pub fn get(&self, key: &ObjPath, display: &str) -> Result<bytes::Bytes, DataError> {
        self.get_optional(key, display)?
            .ok_or_else(|| DataError::Store {
                location: display.to_string(),
                reason: "does not exist".into(),
            })
    }

    /// The bytes `range` of object `key`.
    pub fn get_range(
        &self,
        key: &ObjPath,
        display: &str,
        range: std::ops::Range<u64>,
    ) -> Result<bytes::Bytes, DataError> {
        let store = self.store.clone();
        retry(&self.options, display, "read", || {
            let store = store.clone();
            let key = key.clone();
            let range = range.clone();
            async move { store.get_range(&key, range).await }
        })
    }

    /// The byte ranges `ranges` of object `key`, in order (one vectored read: nearby
    /// ranges are fetched together, so reading many small pieces of one file costs few
    /// requests on an object store).
    pub fn get_ranges(
        &self,
        key: &ObjPath,
        display: &str,
        ranges: &[std::ops::Range<u64>],
    ) -> Result<Vec<bytes::Bytes>, DataError> {
        if ranges.is_empty() {
            return Ok(Vec::new());
        }
        let store = self.store.clone();
        retry(&self.options, display, "read", || {
            let store = store.clone();
            let key = key.clone();
            async move { store.get_ranges(&key, ranges).await }
        })
    }

    /// The BLAKE3 of object `key`, read as a stream (never whole in memory): a local
    /// file in 4 MiB reads, an object in the store's chunks.
    pub fn blake3(&self, key: &ObjPath, display: &str) -> Result<String, DataError> {
        if !self.display.contains("://") {
            let path = std::path::Path::new("/").join(key.as_ref());
            let failed = |e: std::io::Error| DataError::Store {
                location: display.to_string(),
                reason: format!("read failed: {e}"),
            };
            let file = std::fs::File::open(&path).map_err(failed)?;
            let mut reader = std::io::BufReader::with_capacity(4 << 20, file);
            let mut hasher = blake3::Hasher::new();
            hasher.update_reader(&mut reader).map_err(failed)?;
            return Ok(hasher.finalize().to_hex().to_string());
        }
        let store = self.store.clone();
        retry(&self.options, display, "read", || {
            let store = store.clone();
            let key = key.clone();
            async move {
                let mut stream = store.get(&key).await?.into_stream();
                let mut hasher = blake3::Hasher::new();
                while let Some(chunk) = stream.try_next().await? {
                    hasher.update(&chunk);
                }
                Ok(hasher.finalize().to_hex().to_string())
            }
        })
    }

    /// Moves `from` to `to` (a rename locally, a server-side copy and delete on object
    /// stores).
    pub fn rename(&self, from: &ObjPath, to: &ObjPath, display: &str) -> Result<(), DataError> {
        let store = self.store.clone();
        retry(&self.options, display, "move", || {
            let store = store.clone();
            let (from, to) = (from.clone(), to.clone());
            async move { store.rename(&from, &to).await }
        })
    }

    /// Deletes `key` (a missing key is not an error).
    pub fn delete(&self, key: &ObjPath, display: &str) -> Result<(), DataError> {
        let store = self.store.clone();
        retry(&self.options, display, "delete", || {
            let store = store.clone();
            let key = key.clone();
            async move {
                match store.delete(&key).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(e),
                }
            }
        })
    }
}

/// Whether an error may go away if the call is repeated: a network failure (connect,
/// request, timeout, interruption), a 5xx, 408 or 429 status, or an error response a
/// store sent with status 200 (S3's `InternalError`, `SlowDown`). A 4xx that is not a
/// named variant (a bad request, a wrong region), a malformed response and every local
/// filesystem error are not retried.
pub(crate) fn is_transient(e: &object_store::Error) -> bool {
    use object_store::Error as E;
    match e {
        E::Generic { .. } if is_local(e) => false,
        E::Generic { source, .. } => http_transient(source.as_ref()),
        _ => !matches!(
            e,
            E::NotFound { .. }
                | E::InvalidPath { .. }
                | E::NotSupported { .. }
                | E::AlreadyExists { .. }
                | E::Precondition { .. }
                | E::NotModified { .. }
                | E::NotImplemented { .. }
                | E::PermissionDenied { .. }
                | E::Unauthenticated { .. }
                | E::UnknownConfigurationKey { .. }
        ),
    }
}

/// Whether an HTTP client's error is worth repeating (see `is_transient`). The status
/// is read from the message: object_store does not export the error type that holds it.
fn http_transient(source: &(dyn std::error::Error + 'static)) -> bool {
    use object_store::client::{HttpError, HttpErrorKind as K};
    let mut next = Some(source);
    while let Some(e) = next {
        if let Some(http) = e.downcast_ref::<HttpError>() {
            return matches!(
                http.kind(),
                K::Connect | K::Request | K::Timeout | K::Interrupted
            );
        }
        next = e.source();
    }
    let text = source.to_string();
    if let Some((_, rest)) = text.split_once("non-2xx status code: ") {
        return match rest.get(..3).and_then(|c| c.parse::<u16>().ok()) {
            Some(code) => code >= 500 || code == 408 || code == 429,
            None => true,
        };
    }
    text.contains("Server returned error response")
}

/// A local filesystem's error (a path that is not a directory, a full disk, no
/// permission): never transient, and nothing to do with an object store's credentials.
fn is_local(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::Generic { store, .. } if *store == "LocalFileSystem")
}

/// Runs `op` on the I/O runtime, retrying transient failures with exponential backoff;
/// warns on stderr before each retry. The final error names `display` and `what`.
pub(crate) fn retry<T, F, Fut>(
    options: &StorageOptions,
    display: &str,
    what: &str,
    mut op: F,
) -> Result<T, DataError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, object_store::Error>>,
{
    let mut local = None;
    let result = retry_with(
        options,
        display,
        what,
        (is_transient, |_| STORE_ADVICE),
        || {
            runtime().block_on(op()).inspect_err(|e| {
                if is_local(e) {
                    local = Some(e.to_string());
                }
            })
        },
    );
    match (result, local) {
        // A local path's error fails at once, with the OS error and the path.
        (Err(_), Some(e)) => Err(DataError::Store {
            location: display.to_string(),
            reason: format!("{what} failed: {e}"),
        }),
        (result, _) => result,
    }
}

/// What to check when a store call fails for good.
pub(crate) const STORE_ADVICE: &str = "check that the store is reachable \
     (data.storage.endpoint) and that the object exists and the credentials allow reading it";

/// The retry loop, for any error type: `judge.0` decides which errors are retried, and
/// `judge.1` what the final error advises.
pub(crate) fn retry_with<T, E: std::fmt::Display>(
    options: &StorageOptions,
    display: &str,
    what: &str,
    judge: (impl Fn(&E) -> bool, impl Fn(&E) -> &'static str),
    mut op: impl FnMut() -> Result<T, E>,
) -> Result<T, DataError> {
    let (transient, advice) = judge;
    let mut wait = options.backoff;
    let mut attempt = 0;
    loop {
        match op() {
            Ok(v) => return Ok(v),
            Err(e) if transient(&e) && attempt < options.retries => {
                attempt += 1;
                crate::log_line!(
                    "warning: {display}: {what} failed ({e}); retry {attempt}/{} in {:.1} s",
                    options.retries,
                    wait.as_secs_f64()
                );
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(10));
            }
            Err(e) => {
                let tries = if attempt > 0 {
                    format!(" after {} attempts", attempt + 1)
                } else {
                    String::new()
                };
                return Err(DataError::Store {
                    location: display.to_string(),
                    reason: format!("{what} failed{tries}: {e}; {}", advice(&e)),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An HTTP server on 127.0.0.1 that answers every request with `status`; counts them.
    fn server(status: &'static str) -> (String, Arc<AtomicUsize>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf);
                seen.fetch_add(1, Ordering::SeqCst);
                let body = "<Error><Code>Test</Code></Error>";
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        (endpoint, count)
    }

    #[test]
    fn only_retryable_failures_are_retried() {
        std::env::set_var("AWS_ACCESS_KEY_ID", "test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
        for (status, requests) in [
            ("503 Service Unavailable", 3),
            ("429 Too Many Requests", 3),
            ("400 Bad Request", 1),
            ("405 Method Not Allowed", 1),
        ] {
            let (endpoint, count) = server(status);
            let options = StorageOptions {
                endpoint: Some(endpoint),
                region: None,
                retries: 2,
                backoff: Duration::from_millis(1),
            };
            let at = Location::open("s3://bucket/prefix", &options).unwrap();
            let err = at.get(&at.child("object"), "s3://bucket/prefix/object");
            let err = err.unwrap_err().to_string();
            assert_eq!(count.load(Ordering::SeqCst), requests, "{status}: {err}");
            assert!(err.contains("s3://bucket/prefix/object"), "{err}");
        }
        // Nothing listening: a connection failure is retried.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let options = StorageOptions {
            endpoint: Some(endpoint),
            region: None,
            retries: 1,
            backoff: Duration::from_millis(1),
        };
        let at = Location::open("s3://bucket/prefix", &options).unwrap();
        let err = at
            .get(&at.child("object"), "object")
            .unwrap_err()
            .to_string();
        assert!(err.contains("after 2 attempts"), "{err}");
    }
}
