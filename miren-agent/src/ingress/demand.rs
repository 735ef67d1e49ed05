//! This node's demand for auto services, reported to the cluster: the requests its ingress
//! has in flight for each, while it saw one within the service's `scale_down_delay`. The
//! scheduler sizes every auto service from the sum over the nodes, so the first requests on
//! several nodes at once start one instance, wherever it is placed. Sampled every
//! [`SAMPLE`], and at once when a request finds its service without an instance.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::{Notify, broadcast, watch};

use super::{activation::Activator, routing::LoadTracker};
use crate::control::{ControlPlane, InstanceExit};

/// How often the demand is sampled (a changed value is written at most this often).
const SAMPLE: Duration = Duration::from_millis(250);

/// Reports this node's demand; the ingress's [`Activator`].
#[derive(Debug)]
pub struct DemandReporter {
    control: Arc<ControlPlane>,
    load: Arc<LoadTracker>,
    wake: Notify,
}

/// What the reporter remembers of a service between samples.
#[derive(Debug, Default)]
struct Seen {
    /// The service's request count at the last sample.
    requests: u64,
    /// When it last had a request.
    busy_at: Option<Instant>,
}

impl DemandReporter {
    /// A reporter of the requests `load` counts, through `control`.
    pub fn new(control: Arc<ControlPlane>, load: Arc<LoadTracker>) -> Arc<Self> {
        Arc::new(Self {
            control,
            load,
            wake: Notify::new(),
        })
    }

    /// Samples and reports until `stop`.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut seen = HashMap::new();
        loop {
            self.report(&mut seen).await;
            tokio::select! {
                () = tokio::time::sleep(SAMPLE) => {}
                () = self.wake.notified() => {}
                _ = stop.wait_for(|stop| *stop) => break,
            }
        }
    }

    /// Writes the demand of every auto service that differs from what the store has.
    async fn report(&self, seen: &mut HashMap<(String, String), Seen>) {
        let services = self.control.auto_services();
        let reported = self.control.reported_demand();
        let now = Instant::now();
        let mut changes = Vec::new();
        for ((app, service), scale_down_delay) in &services {
            let in_flight = self.load.in_flight(app, service);
            let requests = self.load.requests(app, service);
            let entry = seen.entry((app.clone(), service.clone())).or_default();
            if in_flight > 0 || requests != entry.requests {
                entry.busy_at = Some(now);
            }
            entry.requests = requests;
            let demand = entry
                .busy_at
                .filter(|at| now.duration_since(*at) < *scale_down_delay)
                .map(|_| u32::try_from(in_flight).unwrap_or(u32::MAX));
            if reported.get(&(app.clone(), service.clone())) != demand.as_ref() {
                changes.push((app.clone(), service.clone(), demand));
            }
        }
        // Demand for services that are gone or no longer auto.
        for (app, service) in reported.keys() {
            if !services.contains_key(&(app.clone(), service.clone())) {
                changes.push((app.clone(), service.clone(), None));
            }
        }
        seen.retain(|key, _| services.contains_key(key));
        for (app, service, demand) in changes {
            if let Err(err) = self.control.report_demand(&app, &service, demand).await {
                tracing::warn!(%app, %service, %err, "cannot report this node's demand; retrying");
            }
        }
    }
}

impl Activator for DemandReporter {
    fn ensure_starting(&self, app: &str, service: &str) -> Result<(), String> {
        self.control.can_activate(app, service)?;
        self.wake.notify_one();
        Ok(())
    }

    fn instance_exits(&self) -> broadcast::Receiver<InstanceExit> {
        self.control.instance_exits()
    }
}
