//! `ridgectl`: the operator CLI for ridge-scheduler. See `--help`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use reqwest::Method;
use ridge_scheduler::api;
use ridge_scheduler::client::{Client, Reply};
use serde::de::DeserializeOwned;

/// Operate a Ridge mesh: bootstrap tokens, nodes, rooms and routes.
///
/// The operator token is read from RIDGE_ADMIN_TOKEN (never a flag, so it
/// stays out of shell history and process lists).
#[derive(Debug, Parser)]
#[command(name = "ridgectl", version)]
struct Cli {
    /// Scheduler base URL.
    #[arg(
        long,
        env = "RIDGE_SCHEDULER",
        default_value = "https://127.0.0.1:8443"
    )]
    scheduler: String,
    /// PEM certificate (or CA) to trust for the scheduler.
    #[arg(long, env = "RIDGE_CA_CERT")]
    ca_cert: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Bootstrap tokens for enrolling nodes.
    #[command(subcommand)]
    Tokens(TokensCmd),
    /// Registered nodes.
    #[command(subcommand)]
    Nodes(NodesCmd),
    /// Rooms and the nodes that publish/subscribe them.
    Rooms,
    /// The route plan (one tree per room and source node).
    Routes,
}

#[derive(Debug, Subcommand)]
enum TokensCmd {
    /// Mint a token; prints its secret once.
    Create(CreateArgs),
    /// List tokens (no secrets).
    List,
    /// Revoke a token by id.
    Revoke {
        /// Token id (bt-…).
        id: String,
    },
}

#[derive(Debug, Args)]
struct CreateArgs {
    /// Region the enrolled nodes belong to.
    #[arg(long)]
    region: String,
    /// Validity, e.g. 1h, 7d.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: std::time::Duration,
    /// How many nodes may enroll with it.
    #[arg(long, default_value_t = 1)]
    max_uses: u32,
    /// Labels, KEY=VALUE (repeatable), e.g. trust_domain=backbone-1.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Free text.
    #[arg(long, default_value = "")]
    description: String,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE"))
}

#[derive(Debug, Subcommand)]
enum NodesCmd {
    /// List nodes.
    List,
    /// Show one node in detail.
    Show {
        /// Node id (n-…).
        id: String,
    },
    /// Drain a node (or undo with --undo).
    Drain {
        /// Node id (n-…).
        id: String,
        /// Clear the drain flag instead.
        #[arg(long)]
        undo: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ridgectl: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ridgectl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn expect<T: DeserializeOwned>(r: Reply) -> Result<T> {
    if !r.status.is_success() {
        let j = r.json();
        bail!(
            "{} {}: {}",
            r.status.as_u16(),
            j["code"].as_str().unwrap_or("?"),
            j["error"].as_str().unwrap_or(&r.body)
        );
    }
    serde_json::from_str(&r.body).context("unexpected response body")
}

#[allow(clippy::print_stdout, reason = "the CLI's output is its product")]
fn out(json: bool, value: &impl serde::Serialize, table: impl FnOnce() -> String) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        );
    } else {
        print!("{}", table());
    }
}

/// A plain aligned table.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect::<Vec<_>>()
            .join("  ");
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut s = line(header.iter().map(|h| (*h).to_owned()).collect());
    for r in rows {
        s.push_str(&line(r));
    }
    s
}

fn labels(l: &std::collections::BTreeMap<String, String>) -> String {
    l.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

async fn run(cli: Cli) -> Result<()> {
    let token = std::env::var("RIDGE_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .context("set RIDGE_ADMIN_TOKEN to the scheduler's operator token")?;
    let ca = std::fs::read(&cli.ca_cert)
        .with_context(|| format!("cannot read {}", cli.ca_cert.display()))?;
    let c = Client::new(&cli.scheduler, &ca, 1)?;
    let t = Some(token.as_str());
    let json = cli.json;
    match cli.command {
        Command::Tokens(TokensCmd::Create(a)) => {
            let req = api::CreateToken {
                ttl_secs: Some(a.ttl.as_secs()),
                max_uses: Some(a.max_uses),
                region: a.region,
                labels: a.labels.into_iter().collect(),
                description: a.description,
            };
            let info: api::TokenInfo = expect(c.post("/v1/tokens", t, &req).await?)?;
            out(json, &info, || {
                format!(
                    "id:       {}\nregion:   {}\nexpires:  {}\nmax uses: {}\ntoken:    {}\n",
                    info.id,
                    info.region,
                    info.expires_at,
                    info.max_uses,
                    info.token.as_deref().unwrap_or("")
                )
            });
        }
        Command::Tokens(TokensCmd::List) => {
            let l: api::TokenList = expect(c.get("/v1/tokens", t).await?)?;
            out(json, &l, || {
                table(
                    &[
                        "ID",
                        "REGION",
                        "STATE",
                        "USES",
                        "EXPIRES_AT",
                        "LABELS",
                        "DESCRIPTION",
                    ],
                    l.tokens
                        .iter()
                        .map(|x| {
                            vec![
                                x.id.clone(),
                                x.region.clone(),
                                x.state.clone(),
                                format!("{}/{}", x.uses, x.max_uses),
                                x.expires_at.to_string(),
                                labels(&x.labels),
                                x.description.clone(),
                            ]
                        })
                        .collect(),
                )
            });
        }
        Command::Tokens(TokensCmd::Revoke { id }) => {
            let info: api::TokenInfo = expect(
                c.call::<()>(Method::DELETE, &format!("/v1/tokens/{id}"), t, None)
                    .await?,
            )?;
            out(json, &info, || format!("revoked {}\n", info.id));
        }
        Command::Nodes(NodesCmd::List) => {
            let l: api::NodeList = expect(c.get("/v1/nodes", t).await?)?;
            out(json, &l, || {
                table(
                    &[
                        "ID", "REGION", "STATE", "LOAD", "SESSIONS", "MEDIA", "VERSION", "HOSTNAME",
                    ],
                    l.nodes
                        .iter()
                        .map(|n| {
                            vec![
                                n.id.clone(),
                                n.region.clone(),
                                n.state.clone(),
                                format!("{:.2}", n.load),
                                n.sessions.to_string(),
                                n.addresses.media.clone().unwrap_or_default(),
                                n.version.clone(),
                                n.hostname.clone(),
                            ]
                        })
                        .collect(),
                )
            });
        }
        Command::Nodes(NodesCmd::Show { id }) => {
            let d: api::NodeDetail = expect(c.get(&format!("/v1/nodes/{id}"), t).await?)?;
            out(json, &d, || {
                let s = &d.summary;
                let mut o = table(
                    &["FIELD", "VALUE"],
                    vec![
                        vec!["id".into(), s.id.clone()],
                        vec!["region".into(), s.region.clone()],
                        vec!["labels".into(), labels(&s.labels)],
                        vec!["state".into(), s.state.clone()],
                        vec!["drain".into(), s.drain.to_string()],
                        vec!["load".into(), format!("{:.2}", s.load)],
                        vec!["cpu".into(), format!("{:.2}", d.load_report.cpu)],
                        vec!["sessions".into(), s.sessions.to_string()],
                        vec!["pps".into(), d.load_report.pps.to_string()],
                        vec!["cores".into(), d.capabilities.cores.to_string()],
                        vec![
                            "xdp".into(),
                            d.capabilities.xdp_mode.clone().unwrap_or_default(),
                        ],
                        vec!["io_uring".into(), d.capabilities.io_uring.to_string()],
                        vec!["gpus".into(), d.capabilities.gpus.len().to_string()],
                        vec![
                            "media".into(),
                            s.addresses.media.clone().unwrap_or_default(),
                        ],
                        vec!["desired_version".into(), s.desired_version.to_string()],
                        vec![
                            "public_key".into(),
                            format!("{} {}", d.public_key.alg, d.public_key.key),
                        ],
                    ],
                );
                o.push('\n');
                o.push_str(&table(
                    &["PEER", "RTT_MS", "LOSS", "JITTER_MS"],
                    d.links
                        .iter()
                        .map(|l| {
                            vec![
                                l.peer.clone(),
                                format!("{:.1}", l.rtt_ms),
                                format!("{:.4}", l.loss),
                                format!("{:.1}", l.jitter_ms),
                            ]
                        })
                        .collect(),
                ));
                o
            });
        }
        Command::Nodes(NodesCmd::Drain { id, undo }) => {
            let s: api::NodeSummary = expect(
                c.post(
                    &format!("/v1/nodes/{id}/drain"),
                    t,
                    &api::DrainRequest { drain: !undo },
                )
                .await?,
            )?;
            out(json, &s, || {
                format!("{} drain={} state={}\n", s.id, s.drain, s.state)
            });
        }
        Command::Rooms => {
            let l: api::RoomList = expect(c.get("/v1/rooms", t).await?)?;
            out(json, &l, || {
                table(
                    &["ROOM", "PUBLISHERS", "SUBSCRIBERS"],
                    l.rooms
                        .iter()
                        .map(|r| {
                            vec![
                                r.room.clone(),
                                r.publishers.join(","),
                                r.subscribers.join(","),
                            ]
                        })
                        .collect(),
                )
            });
        }
        Command::Routes => {
            let l: api::RouteList = expect(c.get("/v1/routes", t).await?)?;
            out(json, &l, || {
                table(
                    &["ROOM", "SOURCE", "EDGES", "UNREACHABLE"],
                    l.routes
                        .iter()
                        .map(|r| {
                            vec![
                                r.room.clone(),
                                r.source.clone(),
                                r.edges
                                    .iter()
                                    .map(|e| format!("{}->{}", e.from, e.to))
                                    .collect::<Vec<_>>()
                                    .join(" "),
                                r.unreachable.join(","),
                            ]
                        })
                        .collect(),
                )
            });
        }
    }
    Ok(())
}
