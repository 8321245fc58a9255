//! The registry (`annals_api::registry`), the one list of the log's consumers, against
//! the database: what its read models declare is what the migrations made.

use std::sync::Arc;

use annals_commands::HandlerConfig;
use annals_engine::{ConsumerRunner, ReadDatabase};

use crate::database::Fixture;

on_both_backends!(each_read_model_creates_the_tables_its_migrations_made);

/// A read model's table is declared once, in its `row!`: the tables and indexes that
/// declaration creates on a database without them are the ones the migrations made
/// (which stay as the history of databases created before).
async fn each_read_model_creates_the_tables_its_migrations_made(db: Arc<Fixture>) {
    let handlers = annals_commands::Handlers::new(db.store(), HandlerConfig::default());
    for consumer in annals_api::registry::consumers(
        &handlers,
        &Default::default(),
        Arc::new(annals_consumers::timers::SystemClock),
    ) {
        for table in consumer.tables() {
            let migrated = db.described(table.name).await;
            if migrated.0.is_empty() {
                // A read model newer than the migrations: its declaration is its only
                // definition.
                continue;
            }
            let key = format!("(generation, {})", table.key);
            assert!(
                migrated.1.iter().any(|index| index.contains(&key)),
                "{} is keyed by {key}: {:?}",
                table.name,
                migrated.1
            );
            db.execute(&format!("DROP TABLE {}", table.name)).await;
            assert!(db.described(table.name).await.0.is_empty());

            ConsumerRunner::new(db.store(), ReadDatabase::new(db.tables()), consumer.clone())
                .register()
                .await
                .unwrap();
            assert_eq!(
                db.described(table.name).await,
                migrated,
                "{} as declared",
                table.name
            );

            // An index declared after the table was made is made on the next start.
            if let Some(index) = table.indexes.last() {
                db.execute(&format!("DROP INDEX {}", index.name)).await;
                ConsumerRunner::new(db.store(), ReadDatabase::new(db.tables()), consumer.clone())
                    .register()
                    .await
                    .unwrap();
                assert_eq!(db.described(table.name).await, migrated, "{}", index.name);
            }
        }
    }
}
