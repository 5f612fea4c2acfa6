//! A preview's lifecycle as data.
//!
//! [`transition`] is pure and total over [`State`] × [`Event`]: it returns the next state
//! and the [`Effect`]s a driver must carry out, or a [`Rejected`] that says why the event
//! makes no sense now. Drivers persist the new state with a compare-and-set *before*
//! performing effects; effects are idempotent, so a crash anywhere is repaired by running
//! the job again or by a reconciler.
//!
//! Two kinds of events reach a preview:
//! * requests (build, wake, sleep, erase) from waker and the sweepers: they move the
//!   preview into a transitional state and [`Effect::Schedule`] a job;
//! * progress from the job that does the work (machine assigned, phase reached, ready,
//!   failed, stopped, machines deleted). Progress that no longer fits the state (the
//!   preview was erased while it built) comes back with `stale = true` and, if it
//!   carried a machine, an [`Effect::DeleteMachine`] for it: the job stops there.
//!
//! Invariant (property-tested): a machine id held by the old state is either held by the
//! new state or deleted by an effect — nothing is ever left unreferenced.

use serde::{Deserialize, Serialize};

/// Identifier of a machine (a Hetzner server id, a local working directory name).
pub type MachineId = String;

/// Where a build is. Published live to splash pages.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Queued,
    Acquiring,
    Checkout,
    RestoringDb,
    Build,
    Start,
    Health,
    /// Not a build phase: the app, or its machine, stopped while the preview ran.
    Run,
}

impl Phase {
    pub const ALL: [Phase; 7] = [
        Phase::Queued,
        Phase::Acquiring,
        Phase::Checkout,
        Phase::RestoringDb,
        Phase::Build,
        Phase::Start,
        Phase::Health,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Queued => "queued",
            Phase::Acquiring => "acquiring",
            Phase::Checkout => "checkout",
            Phase::RestoringDb => "restoring_db",
            Phase::Build => "build",
            Phase::Start => "start",
            Phase::Health => "health",
            Phase::Run => "run",
        }
    }

    /// What visitors are told when a preview failed here: short and free of anything
    /// from the build (its output can hold secrets; operators see it in the API).
    pub fn failure_summary(self) -> &'static str {
        match self {
            Phase::Queued | Phase::Acquiring => "No machine could be prepared for this preview.",
            Phase::Checkout => "The code could not be checked out.",
            Phase::RestoringDb => "The database could not be restored.",
            Phase::Build => "The build failed.",
            Phase::Start => "The app exited while starting.",
            Phase::Health => "The app did not answer its health check in time.",
            Phase::Run => "The app or its machine stopped unexpectedly.",
        }
    }

    /// Human wording for pages.
    pub fn label(self) -> &'static str {
        match self {
            Phase::Queued => "Waiting for a builder",
            Phase::Acquiring => "Getting a machine",
            Phase::Checkout => "Checking out the code",
            Phase::RestoringDb => "Restoring the database",
            Phase::Build => "Building",
            Phase::Start => "Starting the app",
            Phase::Health => "Waiting for the app to answer",
            Phase::Run => "Running",
        }
    }
}

/// Why a preview was erased.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EraseReason {
    Ttl,
    Manual,
    /// Its merge request was closed: once erased it is gone (*closed*).
    Closed,
    /// Its merge request was merged: once erased it is gone (*merged*).
    Merged,
}

impl EraseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EraseReason::Ttl => "ttl",
            EraseReason::Manual => "manual",
            EraseReason::Closed => "closed",
            EraseReason::Merged => "merged",
        }
    }

    /// Where an erase for this reason ends: a closed or merged merge request leaves
    /// nothing to rebuild.
    fn end(self) -> State {
        match self {
            EraseReason::Ttl | EraseReason::Manual => State::Erased { reason: self },
            EraseReason::Closed => State::Gone { why: GoneWhy::Closed },
            EraseReason::Merged => State::Gone { why: GoneWhy::Merged },
        }
    }

    /// Whether the erase ends the preview for good.
    pub fn is_final(self) -> bool {
        matches!(self, EraseReason::Closed | EraseReason::Merged)
    }
}

/// Why a preview is gone.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GoneWhy {
    /// The branch no longer exists (records from before merge requests were known say
    /// this).
    #[default]
    RefDeleted,
    /// Its merge request was closed without merging.
    Closed,
    /// Its merge request was merged.
    Merged,
}

impl GoneWhy {
    pub fn as_str(self) -> &'static str {
        match self {
            GoneWhy::RefDeleted => "ref_deleted",
            GoneWhy::Closed => "closed",
            GoneWhy::Merged => "merged",
        }
    }
}

/// A running machine and the origin it serves on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Serving {
    pub machine: MachineId,
    pub origin: String,
}

/// Where one preview is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    /// A build job is under way. `serving` is the previous version during a redeploy: it
    /// keeps answering until the new one is ready, and stays if the new one fails.
    /// `restart`: newer code was pushed while `machine` built or held older code; the
    /// build job starts again on a new machine (whose assignment deletes this one), and
    /// nothing more from the old attempt is accepted.
    Building {
        phase: Phase,
        machine: Option<MachineId>,
        serving: Option<Serving>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        restart: bool,
    },
    Running {
        machine: MachineId,
        origin: String,
    },
    /// A sleep job is stopping the machine. A wake asked for meanwhile is remembered.
    Stopping {
        machine: MachineId,
        wake_after: bool,
    },
    Sleeping {
        machine: MachineId,
    },
    Waking {
        machine: MachineId,
    },
    Failed {
        phase: Phase,
        reason: String,
    },
    /// An erase job is deleting these machines.
    Erasing {
        machines: Vec<MachineId>,
        reason: EraseReason,
    },
    /// Nothing runs; the tombstone keeps the URL able to offer a rebuild.
    Erased {
        reason: EraseReason,
    },
    /// The branch no longer exists, or its merge request was closed or merged.
    Gone {
        #[serde(default)]
        why: GoneWhy,
    },
}

/// Kind of job the provisioner runs for a preview (one pending per preview and kind).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Build,
    Wake,
    Sleep,
    Erase,
    /// Dump the running preview's database to S3 (`wakegate db pull`).
    PullDb,
    /// Make the running preview's database again from its image (`wakegate db refresh`).
    RefreshDb,
}

impl JobKind {
    pub const ALL: [JobKind; 6] =
        [JobKind::Build, JobKind::Wake, JobKind::Sleep, JobKind::Erase, JobKind::PullDb, JobKind::RefreshDb];

    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Build => "build",
            JobKind::Wake => "wake",
            JobKind::Sleep => "sleep",
            JobKind::Erase => "erase",
            JobKind::PullDb => "pull_db",
            JobKind::RefreshDb => "refresh_db",
        }
    }

    pub fn parse(s: &str) -> Option<JobKind> {
        JobKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// Something that happened to a preview.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    BuildRequested,
    /// Newer code was pushed: build it, abandoning a build of older code under way (the
    /// running version keeps serving until the new one is ready). A sleeping preview is
    /// rebuilt too.
    Redeploy,
    WakeRequested,
    SleepRequested,
    EraseRequested {
        reason: EraseReason,
    },
    MachineAssigned {
        machine: MachineId,
    },
    PhaseReached {
        phase: Phase,
    },
    Ready {
        machine: MachineId,
        origin: String,
    },
    /// A build or start failed. `machine` is the machine the attempt used, if any: a
    /// failure from a machine the preview no longer builds or wakes on (a rebuild
    /// restarted it, an erase took it) is stale and changes nothing.
    BuildFailed {
        reason: String,
        #[serde(default)]
        machine: Option<MachineId>,
    },
    Stopped,
    MachinesDeleted,
    RefDeleted,
    /// The ref (or merge request) is back: a gone preview may be rebuilt again.
    RefRestored,
    MachineLost {
        machine: MachineId,
        reason: String,
    },
}

/// What a driver must do after persisting the new state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "effect", rename_all = "snake_case")]
pub enum Effect {
    /// Enqueue a job (idempotent per preview and kind).
    Schedule { job: JobKind },
    /// Delete this machine (idempotent: deleting a missing machine succeeds).
    DeleteMachine { machine: MachineId },
    /// Record a failure that did not change what is served (a failed redeploy).
    ReportFailure { phase: Phase, reason: String },
}

/// The result of an accepted event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub state: State,
    pub effects: Vec<Effect>,
    /// The event came from work that is no longer wanted: the job must stop.
    pub stale: bool,
}

/// Why an event was refused. Nothing changes and nothing must be done.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("the branch no longer exists")]
    Gone,
    #[error("not possible while the preview is {0}")]
    Busy(&'static str),
    #[error("the preview is not asleep (it is {0})")]
    NotAsleep(&'static str),
}

impl State {
    /// Stable lowercase name for logs, metrics and the wire.
    pub fn as_str(&self) -> &'static str {
        match self {
            State::Building { .. } => "building",
            State::Running { .. } => "running",
            State::Stopping { .. } => "stopping",
            State::Sleeping { .. } => "sleeping",
            State::Waking { .. } => "waking",
            State::Failed { .. } => "failed",
            State::Erasing { .. } => "erasing",
            State::Erased { .. } => "erased",
            State::Gone { .. } => "gone",
        }
    }

    /// Every machine this state holds a reference to.
    pub fn machines(&self) -> Vec<&MachineId> {
        match self {
            State::Building { machine, serving, .. } => {
                machine.iter().chain(serving.iter().map(|s| &s.machine)).collect()
            }
            State::Running { machine, .. }
            | State::Stopping { machine, .. }
            | State::Sleeping { machine }
            | State::Waking { machine } => vec![machine],
            State::Erasing { machines, .. } => machines.iter().collect(),
            State::Failed { .. } | State::Erased { .. } | State::Gone { .. } => vec![],
        }
    }

    /// The origin to proxy to, if something serves right now.
    pub fn origin(&self) -> Option<&str> {
        match self {
            State::Running { origin, .. } => Some(origin),
            State::Building { serving: Some(s), .. } => Some(&s.origin),
            _ => None,
        }
    }

    /// The job that must exist while the preview is in this state, if any. Reconcilers
    /// re-enqueue it (enqueue is idempotent) to repair a crash between write and enqueue.
    pub fn pending_job(&self) -> Option<JobKind> {
        match self {
            State::Building { .. } => Some(JobKind::Build),
            State::Waking { .. } => Some(JobKind::Wake),
            State::Stopping { .. } => Some(JobKind::Sleep),
            State::Erasing { .. } => Some(JobKind::Erase),
            _ => None,
        }
    }

    /// A fresh build from nothing.
    pub fn queued() -> State {
        State::Building { phase: Phase::Queued, machine: None, serving: None, restart: false }
    }
}

fn to(state: State, effects: Vec<Effect>) -> Result<Transition, Rejected> {
    Ok(Transition { state, effects, stale: false })
}

fn same(state: &State) -> Result<Transition, Rejected> {
    to(state.clone(), vec![])
}

/// The event does not fit the state any more: keep the state, delete the machine the
/// event carried unless the state holds it, and tell the job to stop.
fn stale(state: &State, carried: Option<&MachineId>) -> Result<Transition, Rejected> {
    let effects = match carried {
        Some(m) if !state.machines().contains(&m) => {
            vec![Effect::DeleteMachine { machine: m.clone() }]
        }
        _ => vec![],
    };
    Ok(Transition { state: state.clone(), effects, stale: true })
}

fn schedule(job: JobKind) -> Effect {
    Effect::Schedule { job }
}

fn delete(machine: &MachineId) -> Effect {
    Effect::DeleteMachine { machine: machine.clone() }
}

/// The lifecycle. `now` is accepted so that time-dependent rules live here; the current
/// rules need none, which keeps the table test exhaustive.
pub fn transition(state: &State, event: &Event, _now: crate::Millis) -> Result<Transition, Rejected> {
    use Event as E;
    use State as S;
    match (state, event) {
        // ---- requests ----
        (S::Erased { .. } | S::Failed { .. }, E::BuildRequested | E::Redeploy) => {
            to(State::queued(), vec![schedule(JobKind::Build)])
        }
        (S::Running { machine, origin }, E::BuildRequested | E::Redeploy) => to(
            S::Building {
                phase: Phase::Queued,
                machine: None,
                serving: Some(Serving { machine: machine.clone(), origin: origin.clone() }),
                restart: false,
            },
            vec![schedule(JobKind::Build)],
        ),
        (S::Building { .. }, E::BuildRequested) => same(state),
        // a build that has a machine may be on older code: start it again. One without
        // a machine has not checked anything out yet and will fetch the newest.
        (S::Building { machine: Some(m), serving, restart: false, .. }, E::Redeploy) => to(
            S::Building { phase: Phase::Queued, machine: Some(m.clone()), serving: serving.clone(), restart: true },
            vec![schedule(JobKind::Build)],
        ),
        (S::Building { .. }, E::Redeploy) => same(state),
        // asleep on older code: build the new code (the old machine goes when the new
        // one is assigned)
        (S::Sleeping { machine } | S::Stopping { machine, .. } | S::Waking { machine }, E::Redeploy) => to(
            S::Building { phase: Phase::Queued, machine: Some(machine.clone()), serving: None, restart: true },
            vec![schedule(JobKind::Build)],
        ),
        (S::Gone { .. }, E::BuildRequested | E::Redeploy) => Err(Rejected::Gone),
        (_, E::BuildRequested | E::Redeploy) => Err(Rejected::Busy(state.as_str())),

        (S::Sleeping { machine }, E::WakeRequested) => {
            to(S::Waking { machine: machine.clone() }, vec![schedule(JobKind::Wake)])
        }
        (S::Stopping { machine, .. }, E::WakeRequested) => {
            to(S::Stopping { machine: machine.clone(), wake_after: true }, vec![])
        }
        (S::Running { .. } | S::Waking { .. } | S::Building { .. }, E::WakeRequested) => same(state),
        (S::Gone { .. }, E::WakeRequested) => Err(Rejected::Gone),
        (_, E::WakeRequested) => Err(Rejected::NotAsleep(state.as_str())),

        (S::Running { machine, .. }, E::SleepRequested) => {
            to(S::Stopping { machine: machine.clone(), wake_after: false }, vec![schedule(JobKind::Sleep)])
        }
        (S::Stopping { machine, .. }, E::SleepRequested) => {
            to(S::Stopping { machine: machine.clone(), wake_after: false }, vec![])
        }
        (S::Building { .. } | S::Waking { .. }, E::SleepRequested) => Err(Rejected::Busy(state.as_str())),
        (_, E::SleepRequested) => same(state),

        // a closed or merged merge request ends the preview whatever it was doing; an
        // erase under way takes on that reason, and a gone preview learns why
        (S::Erasing { machines, reason: old }, E::EraseRequested { reason }) if reason.is_final() && old != reason => {
            to(S::Erasing { machines: machines.clone(), reason: *reason }, vec![])
        }
        (S::Erased { .. } | S::Gone { .. }, E::EraseRequested { reason }) if reason.is_final() => {
            to(reason.end(), vec![])
        }
        (S::Erasing { .. } | S::Erased { .. } | S::Gone { .. }, E::EraseRequested { .. }) => same(state),
        (_, E::EraseRequested { reason }) => {
            let machines: Vec<MachineId> = state.machines().into_iter().cloned().collect();
            if machines.is_empty() {
                to(reason.end(), vec![])
            } else {
                to(S::Erasing { machines, reason: *reason }, vec![schedule(JobKind::Erase)])
            }
        }

        // ---- progress from jobs ----
        (S::Building { machine, serving, .. }, E::MachineAssigned { machine: m }) => {
            let mut effects = Vec::new();
            if let Some(old) = machine.as_ref().filter(|old| *old != m) {
                effects.push(delete(old));
            }
            if serving.as_ref().is_some_and(|s| &s.machine == m) {
                // a build must never reuse the machine that serves the old version
                return stale(state, None);
            }
            to(
                S::Building {
                    phase: Phase::Acquiring,
                    machine: Some(m.clone()),
                    serving: serving.clone(),
                    restart: false,
                },
                effects,
            )
        }
        (_, E::MachineAssigned { machine }) => stale(state, Some(machine)),

        (S::Building { machine: Some(m), serving, restart: false, .. }, E::PhaseReached { phase }) => to(
            S::Building { phase: *phase, machine: Some(m.clone()), serving: serving.clone(), restart: false },
            vec![],
        ),
        (_, E::PhaseReached { .. }) => stale(state, None),

        (S::Building { machine: Some(built), serving, restart: false, .. }, E::Ready { machine, origin })
            if built == machine =>
        {
            let effects = match serving {
                Some(old) => vec![delete(&old.machine)],
                None => vec![],
            };
            to(S::Running { machine: machine.clone(), origin: origin.clone() }, effects)
        }
        (S::Waking { machine: m }, E::Ready { machine, origin }) if m == machine => {
            to(S::Running { machine: machine.clone(), origin: origin.clone() }, vec![])
        }
        (_, E::Ready { machine, .. }) => stale(state, Some(machine)),

        // a failure reported by another machine than the one this build or wake is on,
        // or by the attempt a restart abandoned
        (S::Building { machine: current, restart, .. }, E::BuildFailed { machine: Some(m), .. })
            if current.as_ref() != Some(m) || *restart =>
        {
            stale(state, None)
        }
        (S::Waking { machine: current }, E::BuildFailed { machine: Some(m), .. }) if current != m => stale(state, None),
        (S::Building { phase, machine, serving, .. }, E::BuildFailed { reason, .. }) => {
            let effects: Vec<Effect> = machine.iter().map(delete).collect();
            match serving {
                Some(s) => {
                    let mut effects = effects;
                    effects.push(Effect::ReportFailure { phase: *phase, reason: reason.clone() });
                    to(S::Running { machine: s.machine.clone(), origin: s.origin.clone() }, effects)
                }
                None => to(S::Failed { phase: *phase, reason: reason.clone() }, effects),
            }
        }
        (S::Waking { machine }, E::BuildFailed { reason, .. }) => {
            to(S::Failed { phase: Phase::Start, reason: reason.clone() }, vec![delete(machine)])
        }
        (_, E::BuildFailed { .. }) => stale(state, None),

        (S::Stopping { machine, wake_after: true }, E::Stopped) => {
            to(S::Waking { machine: machine.clone() }, vec![schedule(JobKind::Wake)])
        }
        (S::Stopping { machine, wake_after: false }, E::Stopped) => {
            to(S::Sleeping { machine: machine.clone() }, vec![])
        }
        (_, E::Stopped) => stale(state, None),

        // the erase job persists the end state first, then performs these deletes; a
        // crash in between leaves machines no record references, which the orphan reaper
        // removes
        (S::Erasing { machines, reason }, E::MachinesDeleted) => {
            to(reason.end(), machines.iter().map(delete).collect())
        }
        (_, E::MachinesDeleted) => stale(state, None),

        (S::Erased { .. } | S::Failed { .. }, E::RefDeleted) => to(S::Gone { why: GoneWhy::RefDeleted }, vec![]),
        (_, E::RefDeleted) => same(state),
        (S::Gone { .. }, E::RefRestored) => to(S::Erased { reason: EraseReason::Manual }, vec![]),
        (_, E::RefRestored) => same(state),

        (S::Running { machine, .. }, E::MachineLost { machine: lost, reason }) if machine == lost => {
            to(S::Failed { phase: Phase::Run, reason: reason.clone() }, vec![delete(machine)])
        }
        (
            S::Stopping { machine, .. } | S::Sleeping { machine } | S::Waking { machine },
            E::MachineLost { machine: lost, reason },
        ) if machine == lost => to(S::Failed { phase: Phase::Start, reason: reason.clone() }, vec![delete(machine)]),
        (S::Erasing { machines, reason }, E::MachineLost { machine: lost, .. }) if machines.contains(lost) => {
            let rest: Vec<MachineId> = machines.iter().filter(|m| *m != lost).cloned().collect();
            let state = if rest.is_empty() { reason.end() } else { S::Erasing { machines: rest, reason: *reason } };
            to(state, vec![delete(lost)])
        }
        (_, E::MachineLost { .. }) => same(state),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn m(s: &str) -> MachineId {
        s.to_string()
    }

    fn sample_states() -> Vec<State> {
        vec![
            State::Building { phase: Phase::Build, machine: Some(m("b")), serving: None, restart: false },
            State::Running { machine: m("a"), origin: "http://127.0.0.1:1".into() },
            State::Stopping { machine: m("a"), wake_after: false },
            State::Sleeping { machine: m("a") },
            State::Waking { machine: m("a") },
            State::Failed { phase: Phase::Build, reason: "exit 1".into() },
            State::Erasing { machines: vec![m("a")], reason: EraseReason::Ttl },
            State::Erased { reason: EraseReason::Ttl },
            State::Gone { why: GoneWhy::RefDeleted },
        ]
    }

    fn sample_events() -> Vec<Event> {
        vec![
            Event::BuildRequested,
            Event::WakeRequested,
            Event::SleepRequested,
            Event::EraseRequested { reason: EraseReason::Manual },
            Event::MachineAssigned { machine: m("n") },
            Event::PhaseReached { phase: Phase::Health },
            Event::Ready { machine: m("a"), origin: "http://127.0.0.1:2".into() },
            Event::BuildFailed { reason: "boom".into(), machine: None },
            Event::Stopped,
            Event::MachinesDeleted,
            Event::RefDeleted,
            Event::RefRestored,
            Event::MachineLost { machine: m("a"), reason: "gone".into() },
            Event::Redeploy,
        ]
    }

    fn outcome(state: &State, event: &Event) -> String {
        match transition(state, event, 0) {
            Err(Rejected::Gone) => "gone!".into(),
            Err(Rejected::Busy(_)) => "busy!".into(),
            Err(Rejected::NotAsleep(_)) => "awake!".into(),
            Ok(t) if t.stale => "stale".into(),
            Ok(t) if &t.state == state => "=".into(),
            Ok(t) => t.state.as_str().into(),
        }
    }

    /// Every state × event pair. Rows: states in `sample_states` order; columns: build,
    /// wake, sleep, erase, assigned, phase, ready(a), failed, stopped, deleted,
    /// ref-deleted, ref-restored, lost(a), redeploy.
    #[test]
    fn a_failure_from_a_superseded_machine_changes_nothing() {
        let failed = |m: &str| Event::BuildFailed { reason: "app exited (SIGTERM)".into(), machine: Some(m.into()) };
        // a rebuild restarted the build (no machine yet): the old build's failure is stale
        let restarted = State::Building { phase: Phase::Queued, machine: None, serving: None, restart: false };
        let t = transition(&restarted, &failed("old"), 0).unwrap();
        assert!(t.stale && t.state == restarted && t.effects.is_empty());
        // on another machine now: stale too
        let other = State::Building { phase: Phase::Build, machine: Some(m("new")), serving: None, restart: false };
        assert!(transition(&other, &failed("old"), 0).unwrap().stale);
        let waking = State::Waking { machine: m("new") };
        assert!(transition(&waking, &failed("old"), 0).unwrap().stale);
        // from the machine it is on: the build fails, and the machine goes
        let t = transition(&other, &failed("new"), 0).unwrap();
        assert!(!t.stale && matches!(t.state, State::Failed { phase: Phase::Build, .. }));
        assert_eq!(t.effects, vec![Effect::DeleteMachine { machine: m("new") }]);
    }

    #[test]
    fn table() {
        let expected: [[&str; 14]; 9] = [
            [
                "=", "=", "busy!", "erasing", "building", "building", "stale", "failed", "stale", "stale", "=", "=",
                "=", "building",
            ],
            [
                "building", "=", "stopping", "erasing", "stale", "stale", "stale", "stale", "stale", "stale", "=", "=",
                "failed", "building",
            ],
            [
                "busy!", "stopping", "=", "erasing", "stale", "stale", "stale", "stale", "sleeping", "stale", "=", "=",
                "failed", "building",
            ],
            [
                "busy!", "waking", "=", "erasing", "stale", "stale", "stale", "stale", "stale", "stale", "=", "=",
                "failed", "building",
            ],
            [
                "busy!", "=", "busy!", "erasing", "stale", "stale", "running", "failed", "stale", "stale", "=", "=",
                "failed", "building",
            ],
            [
                "building", "awake!", "=", "erased", "stale", "stale", "stale", "stale", "stale", "stale", "gone", "=",
                "=", "building",
            ],
            [
                "busy!", "awake!", "=", "=", "stale", "stale", "stale", "stale", "stale", "erased", "=", "=", "erased",
                "busy!",
            ],
            [
                "building", "awake!", "=", "=", "stale", "stale", "stale", "stale", "stale", "stale", "gone", "=", "=",
                "building",
            ],
            [
                "gone!", "gone!", "=", "=", "stale", "stale", "stale", "stale", "stale", "stale", "=", "erased", "=",
                "gone!",
            ],
        ];
        let states = sample_states();
        let events = sample_events();
        let mut mismatches = Vec::new();
        for (i, s) in states.iter().enumerate() {
            for (j, e) in events.iter().enumerate() {
                let got = outcome(s, e);
                if got != expected[i][j] {
                    mismatches.push(format!("{} × {:?}: expected {}, got {}", s.as_str(), e, expected[i][j], got));
                }
            }
        }
        assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    }

    #[test]
    fn redeploy_keeps_serving_and_failure_restores_it() {
        let running = State::Running { machine: m("old"), origin: "o1".into() };
        let t = transition(&running, &Event::BuildRequested, 0).unwrap();
        assert_eq!(t.state.origin(), Some("o1"));
        assert_eq!(t.effects, vec![Effect::Schedule { job: JobKind::Build }]);
        let t = transition(&t.state, &Event::MachineAssigned { machine: m("new") }, 0).unwrap();
        assert_eq!(t.state.origin(), Some("o1"));
        let failed = transition(&t.state, &Event::BuildFailed { reason: "x".into(), machine: None }, 0).unwrap();
        assert_eq!(failed.state, running);
        assert!(failed.effects.contains(&Effect::DeleteMachine { machine: m("new") }));
        let ok = transition(&t.state, &Event::Ready { machine: m("new"), origin: "o2".into() }, 0).unwrap();
        assert_eq!(ok.state, State::Running { machine: m("new"), origin: "o2".into() });
        assert_eq!(ok.effects, vec![Effect::DeleteMachine { machine: m("old") }]);
    }

    #[test]
    fn a_push_restarts_a_build_of_older_code_and_nothing_from_it_counts() {
        let serving = Some(Serving { machine: m("live"), origin: "o1".into() });
        let building =
            State::Building { phase: Phase::Build, machine: Some(m("old")), serving: serving.clone(), restart: false };
        let t = transition(&building, &Event::Redeploy, 0).unwrap();
        assert_eq!(t.state.origin(), Some("o1"), "the running version keeps serving");
        assert_eq!(t.effects, vec![Effect::Schedule { job: JobKind::Build }]);
        let restarting = t.state.clone();
        // the same push again changes nothing
        assert_eq!(transition(&restarting, &Event::Redeploy, 0).unwrap().state, restarting);
        // what the abandoned attempt reports is stale, and its machine stays held until
        // the new one is assigned
        for late in [
            Event::PhaseReached { phase: Phase::Health },
            Event::Ready { machine: m("old"), origin: "o2".into() },
            Event::BuildFailed { reason: "killed".into(), machine: Some(m("old")) },
        ] {
            let t = transition(&restarting, &late, 0).unwrap();
            assert!(t.stale && t.effects.is_empty(), "{late:?}: {t:?}");
        }
        let t = transition(&restarting, &Event::MachineAssigned { machine: m("new") }, 0).unwrap();
        assert_eq!(
            t.state,
            State::Building { phase: Phase::Acquiring, machine: Some(m("new")), serving, restart: false }
        );
        assert_eq!(t.effects, vec![Effect::DeleteMachine { machine: m("old") }]);
        // a build that has no machine yet will fetch the newest code anyway
        assert_eq!(transition(&State::queued(), &Event::Redeploy, 0).unwrap().state, State::queued());
    }

    #[test]
    fn a_closed_or_merged_change_ends_in_gone_with_its_reason() {
        let running = State::Running { machine: m("a"), origin: "o".into() };
        let merged = Event::EraseRequested { reason: EraseReason::Merged };
        let t = transition(&running, &merged, 0).unwrap();
        assert_eq!(t.state, State::Erasing { machines: vec![m("a")], reason: EraseReason::Merged });
        let t = transition(&t.state, &Event::MachinesDeleted, 0).unwrap();
        assert_eq!(t.state, State::Gone { why: GoneWhy::Merged });
        assert_eq!(t.effects, vec![Effect::DeleteMachine { machine: m("a") }]);
        // nothing to rebuild, and a push changes nothing
        assert_eq!(transition(&t.state, &Event::BuildRequested, 0), Err(Rejected::Gone));
        assert_eq!(transition(&t.state, &Event::Redeploy, 0), Err(Rejected::Gone));
        // an erase by TTL under way, or already done, learns the final reason
        let ttl = State::Erasing { machines: vec![m("a")], reason: EraseReason::Ttl };
        let closed = Event::EraseRequested { reason: EraseReason::Closed };
        assert_eq!(
            transition(&ttl, &closed, 0).unwrap().state,
            State::Erasing { machines: vec![m("a")], reason: EraseReason::Closed }
        );
        let erased = State::Erased { reason: EraseReason::Ttl };
        assert_eq!(transition(&erased, &closed, 0).unwrap().state, State::Gone { why: GoneWhy::Closed });
        // a reopened merge request can be built again
        let t = transition(&State::Gone { why: GoneWhy::Closed }, &Event::RefRestored, 0).unwrap();
        assert_eq!(transition(&t.state, &Event::BuildRequested, 0).unwrap().state, State::queued());
        // records written before reasons existed read as a deleted ref
        let old: State = serde_json::from_str(r#"{"state":"gone"}"#).unwrap();
        assert_eq!(old, State::Gone { why: GoneWhy::RefDeleted });
    }

    #[test]
    fn wake_during_stop_is_remembered() {
        let t = transition(&State::Stopping { machine: m("a"), wake_after: false }, &Event::WakeRequested, 0).unwrap();
        let t = transition(&t.state, &Event::Stopped, 0).unwrap();
        assert_eq!(t.state, State::Waking { machine: m("a") });
        assert_eq!(t.effects, vec![Effect::Schedule { job: JobKind::Wake }]);
    }

    #[test]
    fn late_machine_of_an_erased_build_is_deleted() {
        let t =
            transition(&State::Erased { reason: EraseReason::Manual }, &Event::MachineAssigned { machine: m("x") }, 0)
                .unwrap();
        assert!(t.stale);
        assert_eq!(t.effects, vec![Effect::DeleteMachine { machine: m("x") }]);
    }

    fn arb_machine() -> impl Strategy<Value = MachineId> {
        prop_oneof![Just(m("a")), Just(m("b")), Just(m("c"))]
    }

    fn arb_event() -> impl Strategy<Value = Event> {
        prop_oneof![
            Just(Event::BuildRequested),
            Just(Event::WakeRequested),
            Just(Event::SleepRequested),
            prop_oneof![Just(EraseReason::Ttl), Just(EraseReason::Manual)]
                .prop_map(|reason| Event::EraseRequested { reason }),
            arb_machine().prop_map(|machine| Event::MachineAssigned { machine }),
            proptest::sample::select(Phase::ALL.to_vec()).prop_map(|phase| Event::PhaseReached { phase }),
            (arb_machine(), "[a-z]{1,4}")
                .prop_map(|(machine, o)| Event::Ready { machine, origin: format!("http://{o}") }),
            Just(Event::BuildFailed { reason: "r".into(), machine: None }),
            arb_machine().prop_map(|m| Event::BuildFailed { reason: "r".into(), machine: Some(m) }),
            Just(Event::Stopped),
            Just(Event::MachinesDeleted),
            Just(Event::RefDeleted),
            Just(Event::RefRestored),
            Just(Event::Redeploy),
            prop_oneof![Just(EraseReason::Closed), Just(EraseReason::Merged)]
                .prop_map(|reason| Event::EraseRequested { reason }),
            arb_machine().prop_map(|machine| Event::MachineLost { machine, reason: "lost".into() }),
        ]
    }

    proptest! {
        #[test]
        fn invariants_hold_over_random_histories(events in proptest::collection::vec(arb_event(), 1..60)) {
            let mut state = State::queued();
            for event in &events {
                let before = state.clone();
                let Ok(t) = transition(&state, event, 0) else { continue };
                let deleted: Vec<&MachineId> = t.effects.iter().filter_map(|e| match e {
                    Effect::DeleteMachine { machine } => Some(machine),
                    _ => None,
                }).collect();
                // no machine id is dropped without a delete effect
                for held in before.machines() {
                    prop_assert!(t.state.machines().contains(&held) || deleted.contains(&held),
                        "{:?} --{:?}--> {:?} dropped {}", before, event, t.state, held);
                }
                // a machine still held is never deleted
                for d in &deleted {
                    prop_assert!(!t.state.machines().contains(d), "deleted a held machine {}", d);
                }
                // running always has an origin, and a build never reuses the serving machine
                match &t.state {
                    State::Running { origin, .. } => prop_assert!(!origin.is_empty()),
                    State::Building { machine: Some(b), serving: Some(s), .. } => prop_assert_ne!(b, &s.machine),
                    _ => {}
                }
                // a scheduled job is the one the new state waits on
                for e in &t.effects {
                    if let Effect::Schedule { job } = e {
                        prop_assert_eq!(Some(*job), t.state.pending_job());
                    }
                }
                if t.stale { prop_assert_eq!(&t.state, &before); }
                state = t.state;
            }
        }
    }
}
