//! `fleet-hub demo`. For now it performs and shows the set-up the demo stands on (the private
//! database, created, started, migrated and stopped); the simulated fleet and the sample
//! rollout come with the rollout engine.

use crate::cli::DemoArgs;
use crate::db::Database;
use crate::error::Error;

pub async fn run(args: DemoArgs) -> Result<(), Error> {
    let DemoArgs { clusters, database } = args;
    println!("fleet-hub demo");
    let db = Database::open(database.database_url.as_deref(), &database.data_dir).await?;
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&db.pool)
        .await
        .map_err(Error::Database)?;
    if db.is_embedded() {
        println!(
            "  database: private Postgres under {} ({} migration(s) applied)",
            database.data_dir.display(),
            applied
        );
    } else {
        println!("  database: {} ({} migration(s) applied)", db.url, applied);
    }
    println!(
        "  simulated fleet of {clusters} clusters and the sample rollout: not implemented yet \
         (they arrive with the rollout engine); nothing else was started."
    );
    db.close().await?;
    println!("  database stopped cleanly; run `fleet-hub serve` to keep it up with the API.");
    Ok(())
}
