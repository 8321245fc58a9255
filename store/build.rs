//! `sqlx::migrate!` embeds the migrations at compile time; tell Cargo to rebuild the
//! store when a migration is added or changed.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
