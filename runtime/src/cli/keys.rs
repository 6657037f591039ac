//! `wasmq keys`: make and show Ed25519 signing keys for plugins and releases.

use std::path::PathBuf;

use clap::Subcommand;

use super::exit::Failure;
use crate::signing::SigningKey;

#[derive(Debug, Subcommand)]
pub(super) enum KeysCommand {
    /// Generate a signing key: writes NAME.key (private, mode 0600) and NAME.pub (the public
    /// key to list in a worker's or tenant's trusted_keys), and prints the public key.
    Generate {
        /// The key's path without extension, e.g. keys/acme-deploy.
        name: PathBuf,
    },
    /// Print the public key (and its id) of a private key file.
    Show {
        /// The private key file.
        key: PathBuf,
    },
}

pub(super) fn run(command: KeysCommand) -> Result<(), Failure> {
    match command {
        KeysCommand::Generate { name } => {
            let private = name.with_extension("key");
            let public = name.with_extension("pub");
            for path in [&private, &public] {
                if path.exists() {
                    return Err(Failure::bad_input(format!(
                        "{} exists: a key is never overwritten",
                        path.display()
                    )));
                }
            }
            if let Some(parent) = private.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|e| {
                    Failure::bad_input(format!("cannot create {}: {e}", parent.display()))
                })?;
            }
            let key = SigningKey::generate().map_err(Failure::internal)?;
            key.write(&private).map_err(|e| {
                Failure::bad_input(format!("cannot write {}: {e}", private.display()))
            })?;
            std::fs::write(
                &public,
                format!(
                    "# wasmq public key {} (list it in trusted_keys)\n{}\n",
                    key.public().key_id(),
                    key.public()
                ),
            )
            .map_err(|e| Failure::bad_input(format!("cannot write {}: {e}", public.display())))?;
            eprintln!(
                "wrote {} (secret) and {}; key id {}",
                private.display(),
                public.display(),
                key.public().key_id()
            );
            println!("{}", key.public());
            Ok(())
        }
        KeysCommand::Show { key } => {
            let key = SigningKey::read(&key).map_err(Failure::bad_input)?;
            println!("{}  (key id {})", key.public(), key.public().key_id());
            Ok(())
        }
    }
}
