//! Cluster-wide TLS: certificates every node's ingress serves (`certs/HOST`), and the pending
//! ACME HTTP-01 challenges (`challenges/TOKEN`, under the ordering node's lease) that any
//! node's ingress answers.

use super::{ControlError, ControlPlane};
use crate::store::{
    Txn,
    records::{ACME, AcmeAccount, CertRecord, Challenge, RecordKey, encode},
};

impl ControlPlane {
    /// Every stored certificate.
    pub fn certs(&self) -> Vec<CertRecord> {
        self.view
            .lock()
            .certs
            .values()
            .map(|cert| cert.value.clone())
            .collect()
    }

    /// Stores `cert` for its host, replacing one stored before — except that an `acme`
    /// certificate never replaces a `user` one (decided on the view and guarded by a compare,
    /// so a `miren cert set` racing an ACME order wins).
    ///
    /// # Errors
    /// [`ControlError::Conflict`] for an `acme` certificate over a `user` one; store errors.
    pub async fn put_cert(&self, cert: CertRecord) -> Result<(), ControlError> {
        let key = RecordKey::Cert(cert.host.clone());
        self.run(|state| {
            let current = state.certs.get(&cert.host);
            if cert.source == "acme" && current.is_some_and(|c| c.value.source == "user") {
                return Err(ControlError::Conflict(format!(
                    "{} has a certificate set with `miren cert set`; ACME does not replace it",
                    cert.host
                )));
            }
            let mut txn = Txn::default();
            txn.compare(key.clone(), current.map_or(0, |c| c.mod_revision))
                .put(key.clone(), encode(&cert));
            Ok((txn, ()))
        })
        .await
    }

    /// Removes the certificate of `host`.
    ///
    /// # Errors
    /// Store errors.
    pub async fn remove_cert(&self, host: &str) -> Result<(), ControlError> {
        let mut txn = Txn::default();
        txn.delete(RecordKey::Cert(host.to_owned()));
        self.run(|_| Ok((txn.clone(), ()))).await
    }

    /// Publishes an HTTP-01 challenge for every node's ingress, under this node's lease.
    ///
    /// # Errors
    /// Store errors.
    pub async fn publish_challenge(
        &self,
        token: &str,
        key_authorization: &str,
    ) -> Result<(), ControlError> {
        let mut txn = Txn::default();
        txn.put_leased(
            RecordKey::Challenge(token.to_owned()),
            encode(&Challenge {
                key_authorization: key_authorization.to_owned(),
            }),
            Some(self.lease.id()),
        );
        self.run(|_| Ok((txn.clone(), ()))).await
    }

    /// Withdraws a challenge.
    ///
    /// # Errors
    /// Store errors.
    pub async fn withdraw_challenge(&self, token: &str) -> Result<(), ControlError> {
        let mut txn = Txn::default();
        txn.delete(RecordKey::Challenge(token.to_owned()));
        self.run(|_| Ok((txn.clone(), ()))).await
    }

    /// The cluster's ACME account, if one was stored.
    pub fn acme_account(&self) -> Option<AcmeAccount> {
        self.view
            .lock()
            .acme_account
            .as_ref()
            .map(|account| account.value.clone())
    }

    /// Stores the cluster's ACME account; only while this node holds the `acme` role (the
    /// write compares the role's key, so a former holder cannot overwrite it).
    ///
    /// # Errors
    /// [`ControlError::Conflict`] when this node does not hold the role; store errors.
    pub async fn put_acme_account(&self, account: AcmeAccount) -> Result<(), ControlError> {
        let node = &self.settings.node;
        self.run(|state| {
            let role = state
                .leaders
                .get(ACME)
                .filter(|leader| leader.value.node == *node)
                .ok_or_else(|| {
                    ControlError::Conflict(format!(
                        "node \"{node}\" does not hold the acme role; another node orders certificates"
                    ))
                })?;
            let mut txn = Txn::default();
            txn.compare(RecordKey::Leader(ACME.into()), role.mod_revision)
                .compare(
                    RecordKey::AcmeAccount,
                    state.acme_account.as_ref().map_or(0, |a| a.mod_revision),
                )
                .put(RecordKey::AcmeAccount, encode(&account));
            Ok((txn, ()))
        })
        .await
    }

    /// The key authorization to answer for `token`, if a challenge with it is pending.
    pub fn challenge(&self, token: &str) -> Option<String> {
        self.view.lock().challenges.get(token).cloned()
    }
}
