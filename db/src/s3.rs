//! The bucket dumps live in, through aws-sdk-s3: AWS, Hetzner Object Storage, or any
//! S3-compatible store (endpoint, region, path-style addressing and credentials are
//! settings).
//!
//! Uploads are multipart with presigned part URLs: the CLI sends the bytes straight to
//! the store, never through Wakegate, and an interrupted upload is resumed by asking
//! which parts are there. Builds get a presigned download URL, never the credentials.

use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use std::time::Duration;

/// How to reach the bucket.
#[derive(Clone, Debug)]
pub struct S3Config {
    /// `None`: AWS's own endpoints for the region.
    pub endpoint: Option<String>,
    pub region: String,
    pub bucket: String,
    /// Path-style addressing (`endpoint/bucket/key`), which most S3-compatible stores
    /// and local ones need.
    pub path_style: bool,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Prepended to every key (`wakegate/`).
    pub prefix: String,
}

/// A part already in an upload.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Part {
    pub number: i32,
    pub etag: String,
    pub size: u64,
}

#[derive(Clone)]
pub struct Bucket {
    client: aws_sdk_s3::Client,
    pub config: S3Config,
}

/// An S3 failure, as one sentence.
fn err<E: std::error::Error + 'static>(what: &str, e: aws_sdk_s3::error::SdkError<E>) -> String {
    use aws_sdk_s3::error::DisplayErrorContext;
    format!("S3 {what}: {}", DisplayErrorContext(&e))
}

/// Most parts an S3 multipart upload may have.
pub const MAX_PARTS: i32 = 10_000;

impl Bucket {
    pub fn new(config: S3Config) -> Bucket {
        let creds = Credentials::new(&config.access_key_id, &config.secret_access_key, None, None, "wakegate");
        let mut b = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            .credentials_provider(creds)
            .force_path_style(config.path_style)
            // checksums only where S3 requires them: several S3-compatible stores refuse
            // the newer default trailers, and presigned part URLs must not carry them
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if let Some(ep) = &config.endpoint {
            b = b.endpoint_url(ep);
        }
        Bucket { client: aws_sdk_s3::Client::from_conf(b.build()), config }
    }

    /// Creates the bucket if it is missing (for `wakegate dev` and tests; production
    /// buckets are made by their owner).
    pub async fn ensure(&self) -> Result<(), String> {
        if self.client.head_bucket().bucket(&self.config.bucket).send().await.is_ok() {
            return Ok(());
        }
        self.client.create_bucket().bucket(&self.config.bucket).send().await.map_err(|e| err("create bucket", e))?;
        Ok(())
    }

    pub async fn start_upload(&self, key: &str) -> Result<String, String> {
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.config.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| err("starting an upload", e))?;
        out.upload_id().map(str::to_string).ok_or_else(|| "S3 started an upload without an id".into())
    }

    /// A URL that PUTs part `number` of the upload, valid for `ttl`.
    pub async fn presign_part(&self, key: &str, upload_id: &str, number: i32, ttl: Duration) -> Result<String, String> {
        let cfg = PresigningConfig::expires_in(ttl).map_err(|e| e.to_string())?;
        let req = self
            .client
            .upload_part()
            .bucket(&self.config.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .presigned(cfg)
            .await
            .map_err(|e| err("presigning a part", e))?;
        Ok(req.uri().to_string())
    }

    /// Every part uploaded so far (all pages).
    pub async fn parts(&self, key: &str, upload_id: &str) -> Result<Vec<Part>, String> {
        let mut out = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let page = self
                .client
                .list_parts()
                .bucket(&self.config.bucket)
                .key(key)
                .upload_id(upload_id)
                .set_part_number_marker(marker.clone())
                .send()
                .await
                .map_err(|e| err("listing parts", e))?;
            // some S3-compatible stores list parts without their ETag: it is then empty
            for p in page.parts() {
                if let Some(number) = p.part_number() {
                    let etag = p.e_tag().unwrap_or_default().to_string();
                    out.push(Part { number, etag, size: p.size().unwrap_or(0).max(0) as u64 });
                }
            }
            match (page.is_truncated(), page.next_part_number_marker()) {
                (Some(true), Some(next)) if marker.as_deref() != Some(next) => marker = Some(next.to_string()),
                _ => break,
            }
        }
        out.sort_by_key(|p| p.number);
        Ok(out)
    }

    pub async fn complete(&self, key: &str, upload_id: &str, parts: &[Part]) -> Result<(), String> {
        let parts = parts
            .iter()
            .map(|p| CompletedPart::builder().part_number(p.number).e_tag(&p.etag).build())
            .collect::<Vec<_>>();
        self.client
            .complete_multipart_upload()
            .bucket(&self.config.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
            .send()
            .await
            .map_err(|e| err("completing an upload", e))?;
        Ok(())
    }

    /// Drops an unfinished upload and its parts (one that is gone already is fine).
    pub async fn abort(&self, key: &str, upload_id: &str) -> Result<(), String> {
        match self
            .client
            .abort_multipart_upload()
            .bucket(&self.config.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_upload()) => Ok(()),
            Err(e) => Err(err("aborting an upload", e)),
        }
    }

    /// The object's bytes as they arrive.
    pub async fn read(&self, key: &str) -> Result<aws_sdk_s3::primitives::ByteStream, String> {
        let out = self
            .client
            .get_object()
            .bucket(&self.config.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| err("reading a dump", e))?;
        Ok(out.body)
    }

    /// A URL that GETs the object, valid for `ttl` (what builds download dumps with).
    pub async fn presign_get(&self, key: &str, ttl: Duration) -> Result<String, String> {
        let cfg = PresigningConfig::expires_in(ttl).map_err(|e| e.to_string())?;
        let req = self
            .client
            .get_object()
            .bucket(&self.config.bucket)
            .key(key)
            .presigned(cfg)
            .await
            .map_err(|e| err("presigning a download", e))?;
        Ok(req.uri().to_string())
    }

    /// A URL that PUTs the object in one request, valid for `ttl` (a machine's agent
    /// uploads a pulled database with it; S3 takes at most 5 GiB this way).
    pub async fn presign_put(&self, key: &str, ttl: Duration) -> Result<String, String> {
        let cfg = PresigningConfig::expires_in(ttl).map_err(|e| e.to_string())?;
        let req = self
            .client
            .put_object()
            .bucket(&self.config.bucket)
            .key(key)
            .presigned(cfg)
            .await
            .map_err(|e| err("presigning an upload", e))?;
        Ok(req.uri().to_string())
    }

    /// The size of an object, `None` when there is none.
    pub async fn size(&self, key: &str) -> Result<Option<u64>, String> {
        match self.client.head_object().bucket(&self.config.bucket).key(key).send().await {
            Ok(o) => Ok(Some(o.content_length().unwrap_or(0).max(0) as u64)),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(None),
            Err(e) => Err(err("reading an object's size", e)),
        }
    }

    /// Deletes an object (a missing one is fine: S3 answers 204 either way).
    pub async fn delete(&self, key: &str) -> Result<(), String> {
        self.client
            .delete_object()
            .bucket(&self.config.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| err("deleting a dump", e))?;
        Ok(())
    }

    /// Uploads what `reader` yields as a multipart object of `part_size` parts, never
    /// holding more than one part; the upload is aborted when anything fails. Returns
    /// the bytes written.
    pub async fn upload_reader<R: tokio::io::AsyncRead + Unpin>(
        &self,
        key: &str,
        mut reader: R,
        part_size: usize,
    ) -> Result<u64, String> {
        use tokio::io::AsyncReadExt;
        let upload_id = self.start_upload(key).await?;
        let result = async {
            let mut parts = Vec::new();
            let mut total = 0u64;
            loop {
                let mut buf = Vec::with_capacity(part_size);
                while buf.len() < part_size {
                    let n = (&mut reader)
                        .take((part_size - buf.len()) as u64)
                        .read_to_end(&mut buf)
                        .await
                        .map_err(|e| format!("reading what to upload: {e}"))?;
                    if n == 0 {
                        break;
                    }
                }
                if buf.is_empty() && !parts.is_empty() {
                    break;
                }
                let number = parts.len() as i32 + 1;
                if number > MAX_PARTS {
                    return Err(format!("more than {MAX_PARTS} parts of {part_size} bytes"));
                }
                let len = buf.len();
                let out = self
                    .client
                    .upload_part()
                    .bucket(&self.config.bucket)
                    .key(key)
                    .upload_id(&upload_id)
                    .part_number(number)
                    .body(buf.into())
                    .send()
                    .await
                    .map_err(|e| err("uploading a part", e))?;
                let etag = out.e_tag().unwrap_or_default().to_string();
                parts.push(Part { number, etag, size: len as u64 });
                total += len as u64;
                if len < part_size {
                    break;
                }
            }
            self.complete(key, &upload_id, &parts).await?;
            Ok(total)
        }
        .await;
        if result.is_err() {
            if let Err(e) = self.abort(key, &upload_id).await {
                tracing::warn!(%key, error = %e, "aborting a failed upload failed; S3's lifecycle rules must collect it");
            }
        }
        result
    }
}
