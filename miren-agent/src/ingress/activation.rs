//! Scale from zero: when a request finds its service without a ready endpoint, the ingress
//! asks the cluster for an instance (its demand, [`super::demand`]) and waits (up to the boot
//! deadline) for one to become ready, on whichever node it was placed. An instance on this
//! node that exits before it is ready ends the wait at once, with its exit status. Concurrent
//! requests for the same service share one activation; the activation runs in its own task,
//! so clients that give up or disconnect leave nothing behind.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::{broadcast, watch};

use super::routing::Routing;
use crate::control::InstanceExit;

/// Asks for instances on demand ([`super::demand::DemandReporter`]).
pub trait Activator: Send + Sync + std::fmt::Debug {
    /// Makes sure an instance of `app`'s `service` is asked for.
    ///
    /// # Errors
    /// Why no instance can be started; the requests waiting for it get a 503 saying so.
    fn ensure_starting(&self, app: &str, service: &str) -> Result<(), String>;

    /// The exits of this node's instances from now on: one of the service's while it is
    /// being activated fails the activation at once.
    fn instance_exits(&self) -> broadcast::Receiver<InstanceExit>;
}

/// How an activation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Activation {
    /// The service has a ready endpoint now.
    Ready,
    /// Nothing could be started, or the instance exited while starting (the reason).
    Failed(String),
    /// No endpoint became ready within the boot deadline.
    TimedOut(Duration),
}

type Key = (String, String);

/// In-flight activations, one per service.
#[derive(Debug)]
pub struct Activations {
    activator: Arc<dyn Activator>,
    routing: Arc<Routing>,
    boot_timeout: Duration,
    in_flight: Mutex<HashMap<Key, watch::Receiver<Option<Activation>>>>,
}

impl Activations {
    /// Activations through `activator`, watching `routing` for endpoints, giving up after
    /// `boot_timeout`.
    pub fn new(
        activator: Arc<dyn Activator>,
        routing: Arc<Routing>,
        boot_timeout: Duration,
    ) -> Self {
        Self {
            activator,
            routing,
            boot_timeout,
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    /// Waits until `app`'s `service` has a ready endpoint, starting one if no activation is
    /// in flight yet.
    pub async fn wait_ready(self: &Arc<Self>, app: &str, service: &str) -> Activation {
        let mut outcome = self.join_or_start(app, service);
        match outcome.wait_for(Option::is_some).await {
            Ok(done) => done.clone().unwrap_or(Activation::Ready),
            Err(_) => Activation::Failed("the activation was abandoned".into()),
        }
    }

    fn join_or_start(
        self: &Arc<Self>,
        app: &str,
        service: &str,
    ) -> watch::Receiver<Option<Activation>> {
        let key = (app.to_owned(), service.to_owned());
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(outcome) = in_flight.get(&key) {
            return outcome.clone();
        }
        let (tx, rx) = watch::channel(None);
        in_flight.insert(key.clone(), rx.clone());
        drop(in_flight);
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let outcome = this.activate(&key.0, &key.1).await;
            this.in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
            tx.send_replace(Some(outcome));
        });
        rx
    }

    async fn activate(&self, app: &str, service: &str) -> Activation {
        let mut changes = self.routing.subscribe();
        // Before the start is asked for, so an instance that exits at once is seen.
        let mut exits = Some(self.activator.instance_exits());
        let ready = || {
            self.routing
                .snapshot()
                .service(app, service)
                .is_some_and(|s| !s.backends.is_empty())
        };
        if ready() {
            return Activation::Ready;
        }
        if let Err(reason) = self.activator.ensure_starting(app, service) {
            return Activation::Failed(reason);
        }
        tracing::info!(app, service, "no ready endpoint; starting an instance");
        let wait = async {
            while !ready() {
                let exit = async {
                    match &mut exits {
                        Some(exits) => exits.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() {
                        return Activation::Failed("the route table is gone".into());
                    },
                    exit = exit => match exit {
                        Ok(exit) if exit.app == app && exit.service == service => {
                            tracing::warn!(
                                app,
                                service,
                                exit = %exit.how,
                                "the instance exited while starting; failing its requests"
                            );
                            return Activation::Failed(format!(
                                "its instance exited while starting ({})",
                                exit.how
                            ));
                        }
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => exits = None,
                    },
                }
            }
            Activation::Ready
        };
        tokio::time::timeout(self.boot_timeout, wait)
            .await
            .unwrap_or(Activation::TimedOut(self.boot_timeout))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::{
        control::IngressRoute,
        ingress::routing::{RoutingSnapshot, SnapshotInputs},
        store::records::RouteRecord,
    };

    #[derive(Debug)]
    struct CountingActivator {
        calls: AtomicUsize,
        exits: broadcast::Sender<InstanceExit>,
    }

    impl Default for CountingActivator {
        fn default() -> Self {
            Self {
                calls: AtomicUsize::new(0),
                exits: broadcast::channel(8).0,
            }
        }
    }

    impl Activator for CountingActivator {
        fn ensure_starting(&self, _app: &str, _service: &str) -> Result<(), String> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }

        fn instance_exits(&self) -> broadcast::Receiver<InstanceExit> {
            self.exits.subscribe()
        }
    }

    fn snapshot(revision: u64, endpoints: &[&str]) -> RoutingSnapshot {
        let route = IngressRoute {
            record: RouteRecord {
                host: "a.example.com".into(),
                app: "a".into(),
                service: "web".into(),
                timeout_ms: None,
            },
            endpoints: endpoints.iter().map(|e| e.parse().unwrap()).collect(),
        };
        RoutingSnapshot::build(
            revision,
            &[route],
            &SnapshotInputs::for_tests(),
            &RoutingSnapshot::default(),
        )
    }

    /// A service without endpoints, activated through a [`CountingActivator`] that gives up
    /// after `boot_timeout`.
    fn unstarted(
        boot_timeout: Duration,
    ) -> (Arc<Routing>, Arc<CountingActivator>, Arc<Activations>) {
        let routing = Arc::new(Routing::new(SnapshotInputs::for_tests()));
        routing.publish(snapshot(1, &[]));
        let activator = Arc::new(CountingActivator::default());
        let activations = Arc::new(Activations::new(
            activator.clone(),
            routing.clone(),
            boot_timeout,
        ));
        (routing, activator, activations)
    }

    #[tokio::test]
    async fn concurrent_requests_share_one_start() {
        let (routing, activator, activations) = unstarted(Duration::from_secs(30));
        let waiters: Vec<_> = (0..20)
            .map(|_| {
                let activations = activations.clone();
                tokio::spawn(async move { activations.wait_ready("a", "web").await })
            })
            .collect();
        while activator.calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        routing.publish(snapshot(2, &["10.0.0.1:80"]));
        for waiter in waiters {
            assert_eq!(waiter.await.unwrap(), Activation::Ready);
        }
        assert_eq!(activator.calls.load(Ordering::SeqCst), 1);
        assert!(activations.in_flight.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_the_boot_deadline_and_cleans_up() {
        let (_routing, activator, activations) = unstarted(Duration::from_secs(120));
        // A client that gives up early does not cancel or leak the activation.
        let impatient = activations.clone();
        let _ = tokio::time::timeout(Duration::from_secs(1), async move {
            impatient.wait_ready("a", "web").await
        })
        .await;
        assert_eq!(activations.in_flight.lock().unwrap().len(), 1);
        assert_eq!(
            activations.wait_ready("a", "web").await,
            Activation::TimedOut(Duration::from_secs(120))
        );
        assert_eq!(activator.calls.load(Ordering::SeqCst), 1);
        assert!(activations.in_flight.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_instance_exiting_while_starting_fails_the_activation_at_once() {
        let (_routing, activator, activations) = unstarted(Duration::from_secs(120));
        let waiter = {
            let activations = activations.clone();
            tokio::spawn(async move { activations.wait_ready("a", "web").await })
        };
        while activator.calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let exit = |app: &str, service: &str| InstanceExit {
            app: app.into(),
            service: service.into(),
            how: "exit status: 3".into(),
        };
        // Another service's exit is not this activation's.
        activator.exits.send(exit("a", "worker")).unwrap();
        activator.exits.send(exit("a", "web")).unwrap();
        let outcome = waiter.await.unwrap();
        assert_eq!(
            outcome,
            Activation::Failed("its instance exited while starting (exit status: 3)".into())
        );
        assert!(activations.in_flight.lock().unwrap().is_empty());
    }
}
