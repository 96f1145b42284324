//! What deployments tell the world outside the receiver: events put on a
//! queue by the deployer (a deployment settled, became production, or a
//! button did nothing) and taken off it by whoever reports them
//! (`github::report`). The deployer never waits on the taker, and does not
//! know who it is: data flows from the API to the deployer to the queue.

use tokio::sync::mpsc;

/// Something to tell GitHub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A deployment became healthy or failed.
    Settled(String),
    /// A deployment became production, replacing `previous`.
    Promoted { deployment: String, previous: Option<String> },
    /// Why a button of a deployment's check run, or an approval of its
    /// pull request, did nothing: shown on the deployment's check run.
    Note { deployment: String, title: String, message: String },
}

/// Queues events for the reporting task; does nothing when GitHub is not
/// configured.
#[derive(Debug, Clone, Default)]
pub struct Reporter {
    tx: Option<mpsc::UnboundedSender<Event>>,
}

impl Reporter {
    pub fn new() -> (Reporter, mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Reporter { tx: Some(tx) }, rx)
    }

    /// A reporter that reports nothing.
    pub fn off() -> Reporter {
        Reporter { tx: None }
    }

    pub fn send(&self, event: Event) {
        if let Some(tx) = &self.tx {
            if tx.send(event).is_ok() {
                crate::counters::platform().github_queue.inc();
            }
        }
    }
}
