//! The bench process's own log (the daemon's, when it runs in this process): on stderr, so it
//! stays apart from the report on stdout, filtered by `RUST_LOG` or else by the bench's default.

/// Installs the subscriber; `default_filter` applies unless `RUST_LOG` is set.
pub fn init(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .init();
}
