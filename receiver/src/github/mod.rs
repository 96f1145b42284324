//! The GitHub integration: previews reported on pull requests ([`report`]),
//! webhooks acted on ([`webhook`]), promotions from GitHub allowed only to those who may write to
//! the repository ([`approval`]), workflows' OIDC tokens verified ([`oidc`]),
//! all calls made through [`client`] as a token or a GitHub App.
//! Everything here is optional: without a token or app nothing is reported,
//! without a webhook secret no webhook is taken.

pub mod approval;
pub mod client;
pub mod oidc;
pub mod report;
pub mod webhook;
