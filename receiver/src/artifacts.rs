//! Artifacts: a pushed binary is registered once per digest, and removed when
//! no deployment uses it any more. Both hold the artifact's lock, so a push
//! never registers bytes the garbage collector is deleting.

use nx_verify::report::{Linkage, Report};

use crate::db::{ArtifactRow, Db};
use nx_store::{ArtifactStore, StoreError, Upload};

/// Failures of artifact bookkeeping.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Registers a verified upload: the existing artifact when the same bytes were
/// pushed before (the upload is then dropped), else the upload made durable in
/// the store and recorded.
pub async fn register(
    db: &Db,
    store: &ArtifactStore,
    upload: Upload,
    report: &Report,
) -> Result<ArtifactRow, ArtifactError> {
    let mut tx = db.begin().await?;
    Db::lock_artifact(&mut tx, &upload.sha256).await?;
    if let Some(existing) = Db::touch_artifact(&mut tx, &upload.sha256).await? {
        tx.commit().await?;
        return Ok(existing);
    }
    let row = ArtifactRow {
        sha256: upload.sha256.clone(),
        size: upload.size as i64,
        format: "elf".into(),
        arch: report.arch.clone().unwrap_or_default(),
        linkage: match report.linkage {
            Some(Linkage::Dynamic) => "dynamic".into(),
            _ => "static".into(),
        },
    };
    store.publish(upload).await?;
    Db::insert_artifact(&mut tx, &row, &format!("artifacts/{}", row.sha256)).await?;
    tx.commit().await?;
    Ok(row)
}

/// Removes the artifacts no deployment uses and nobody pushed for
/// `grace_secs`, from the database and then the store, and the objects in
/// the store that no row names and that are older than the grace period (left
/// by a crash between the two); returns how many artifacts went. The grace
/// period must outlast a push: it registers its artifact a moment before it
/// records its deployment.
///
/// The row goes first: a crash before the bytes go leaves an object nothing
/// names, which a later round removes. The other order would leave a row
/// without its bytes, which the next push of the same binary would take up
/// (its digest is known) for a deployment that cannot start.
pub async fn collect_garbage(db: &Db, store: &ArtifactStore, grace_secs: i64) -> Result<usize, ArtifactError> {
    let mut removed = 0;
    for sha in db.unused_artifacts(grace_secs).await? {
        let mut tx = db.begin().await?;
        Db::lock_artifact(&mut tx, &sha).await?;
        if !Db::delete_unused_artifact(&mut tx, &sha, grace_secs).await? {
            continue;
        }
        tx.commit().await?;
        if delete_orphan(db, store, &sha).await? {
            tracing::info!(sha256 = %sha, "unused artifact removed");
        }
        removed += 1;
    }
    let grace = std::time::Duration::from_secs(grace_secs.max(0) as u64);
    let named = db.artifact_digests().await?;
    for sha in store.artifacts_older_than(grace).await? {
        if !named.contains(&sha) && delete_orphan(db, store, &sha).await? {
            tracing::info!(sha256 = %sha, "artifact no row names removed from the store");
        }
    }
    Ok(removed)
}

/// Deletes the bytes of `sha` from the store unless a row names them again (a
/// push of the same binary registered them meanwhile); true when deleted.
/// Under the artifact's lock, so no push registers them while they go.
async fn delete_orphan(db: &Db, store: &ArtifactStore, sha: &str) -> Result<bool, ArtifactError> {
    let mut tx = db.begin().await?;
    Db::lock_artifact(&mut tx, sha).await?;
    if Db::artifact_exists(&mut tx, sha).await? {
        return Ok(false);
    }
    store.delete(sha).await?;
    tx.commit().await?;
    Ok(true)
}
