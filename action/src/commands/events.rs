//! `nx events`: the audit log, newest first.

use nx_protocol::api::EventInfo;

use super::{client, print_json};
use crate::cli::{EventsArgs, Global};
use crate::output::table;

pub async fn run(g: &Global, args: EventsArgs) -> anyhow::Result<()> {
    let client = client(g)?;
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    query.append_pair("since", &args.since).append_pair("limit", &args.limit.to_string());
    if let Some(app) = &args.app {
        query.append_pair("app", app);
    }
    let events: Vec<EventInfo> = client.get(&format!("/v1/events?{}", query.finish())).await?;
    if g.json {
        return print_json(&events);
    }
    if events.is_empty() {
        println!("no events since {}", args.since);
        return Ok(());
    }
    let mut rows = vec![["time", "app", "event", "by", "deployment", "detail"].map(str::to_owned).to_vec()];
    rows.extend(events.iter().map(|e| {
        vec![
            e.at.format("%Y-%m-%d %H:%M:%S").to_string(),
            e.app.clone().unwrap_or_default(),
            e.kind.clone(),
            e.actor.clone(),
            e.deployment.clone().unwrap_or_default(),
            nx_protocol::logs::neutralise(&e.detail.to_string()).into_owned(),
        ]
    }));
    print!("{}", table(&rows));
    Ok(())
}
