//! The places of sandboxes made ready for wakes ([`nx_runtime::ready`]):
//! which sleeping deployments hold one, and which gives its place up when a
//! deployment falls asleep and `--wake-ready` or its app's share
//! (`--wake-ready-per-app`) is used up.
//!
//! A place goes to the deployment that fell asleep last, and is taken from
//! the one that has held its place longest: a preview asleep for days is
//! less likely to be visited in the next minute than one asleep since a
//! minute ago, and a place held forever would keep every later sleeper
//! waking the usual way. Production comes first: a preview never takes a
//! production deployment's place. One app's many sleeping previews cannot
//! take every place: past its share it gives up its own.

use std::collections::HashMap;
use std::time::Instant;

use nx_runtime::ready::Ready;

/// Who holds a place, as the choice of which to give up needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Holder {
    pub app: i64,
    pub production: bool,
    /// When it took the place (fell asleep).
    pub since: Instant,
}

/// A place: its holder, and its sandbox once made (`None` while it is
/// being made, under the deployment's hold).
#[derive(Debug)]
pub(super) struct Place {
    pub holder: Holder,
    pub ready: Option<Ready>,
}

/// Every place, by deployment id.
pub(super) type Places = HashMap<String, Place>;

/// Whether `newcomer` gets a place, and whose it takes.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Room {
    Free,
    Taken(String),
    None,
}

/// The room for `newcomer` among `places` with at most `bound` places in
/// all and `per_app` for one app. A place still being made is never taken
/// (its maker holds its deployment and is about to fill it).
pub(super) fn room(places: &Places, newcomer: &Holder, bound: usize, per_app: usize) -> Room {
    choose(places.iter().map(|(id, p)| (id.as_str(), p.holder, p.ready.is_some())), newcomer, bound, per_app)
}

/// [`room`] over `(deployment, holder, made)` of every place.
fn choose<'a>(
    places: impl Iterator<Item = (&'a str, Holder, bool)> + Clone,
    newcomer: &Holder,
    bound: usize,
    per_app: usize,
) -> Room {
    if bound == 0 || per_app == 0 {
        return Room::None;
    }
    let same_app = places.clone().filter(|(_, h, _)| h.app == newcomer.app).count() >= per_app;
    if !same_app && places.clone().count() < bound {
        return Room::Free;
    }
    let oldest = |production: bool| {
        places
            .clone()
            .filter(|(_, h, made)| *made && h.production == production && (!same_app || h.app == newcomer.app))
            .min_by_key(|(_, h, _)| h.since)
            .map(|(id, _, _)| id.to_owned())
    };
    match oldest(false).or_else(|| if newcomer.production { oldest(true) } else { None }) {
        Some(id) => Room::Taken(id),
        None => Room::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The room for `newcomer` among places held by `(id, app, production,
    /// held for seconds, made)`.
    fn room_among(held: &[(&str, i64, bool, u64, bool)], newcomer: (i64, bool), bound: usize, per_app: usize) -> Room {
        let now = Instant::now();
        let at = |age| now - Duration::from_secs(age);
        let places =
            held.iter().map(|&(id, app, production, age, made)| (id, Holder { app, production, since: at(age) }, made));
        let (app, production) = newcomer;
        choose(places, &Holder { app, production, since: now }, bound, per_app)
    }

    #[test]
    fn places_go_to_the_newest_sleeper_production_first_and_each_app_within_its_share() {
        let (preview, production) = (false, true);
        // Room left: nothing is taken.
        assert_eq!(room_among(&[("a", 1, preview, 10, true)], (2, preview), 2, 2), Room::Free);
        // Full: the preview held longest gives its place up, whatever its app.
        let full = [("old", 1, preview, 300, true), ("new", 2, preview, 10, true)];
        assert_eq!(room_among(&full, (3, preview), 2, 2), Room::Taken("old".into()));
        // One still being made is not taken, however old.
        let making = [("old", 1, preview, 300, false), ("new", 2, preview, 10, true)];
        assert_eq!(room_among(&making, (3, preview), 2, 2), Room::Taken("new".into()));
        // A preview never takes production's place; production takes a
        // preview's first, then the production held longest.
        let productions = [("p1", 1, production, 300, true), ("p2", 2, production, 10, true)];
        assert_eq!(room_among(&productions, (3, preview), 2, 2), Room::None);
        assert_eq!(room_among(&productions, (3, production), 2, 2), Room::Taken("p1".into()));
        let mixed = [("p", 1, production, 300, true), ("v", 2, preview, 10, true)];
        assert_eq!(room_among(&mixed, (3, production), 2, 2), Room::Taken("v".into()));
        // An app at its share gives up its own oldest, not another app's.
        let share = [("x1", 1, preview, 50, true), ("x2", 1, preview, 20, true), ("y", 2, preview, 500, true)];
        assert_eq!(room_among(&share, (1, preview), 10, 2), Room::Taken("x1".into()));
        assert_eq!(room_among(&share, (2, preview), 10, 2), Room::Free);
        // Off.
        assert_eq!(room_among(&[], (1, preview), 0, 2), Room::None);
        assert_eq!(room_among(&[], (1, preview), 2, 0), Room::None);
    }
}
