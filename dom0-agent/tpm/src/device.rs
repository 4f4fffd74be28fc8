//! The TPM itself, through tss-esapi (feature `esapi`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;

use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{KeyHandle, ObjectHandle, PcrHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::PolicySession;
use tss_esapi::structures::{
    Data, Digest, DigestList, DigestValues, EccPoint, EccScheme, HashScheme,
    KeyDerivationFunctionScheme, PcrSelectionListBuilder, PcrSlot, Public, PublicBuilder,
    PublicEccParametersBuilder, PublicKeyedHashParameters, SensitiveData, SignatureScheme,
    SymmetricDefinition, SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::Marshall;
use tss_esapi::Context;
use zeroize::Zeroizing;

use crate::blob::MAX_STATES;
use crate::quote::Quote;
use crate::{
    check_selection, hex, pcr_digest, quote, PcrValue, SealedBlob, SelectionError, MAX_PCR,
};

/// What went wrong talking to the TPM.
#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    /// The TCTI string could not be parsed or the TPM could not be reached.
    #[error("cannot open the TPM through TCTI {tcti:?}: {source}")]
    Open {
        /// The TCTI configuration string.
        tcti: String,
        /// What tss-esapi reported.
        source: tss_esapi::Error,
    },
    /// The TPM's descriptors could not be listed or made close-on-exec (`/proc/self/fd`);
    /// the connection is closed again rather than left inheritable.
    #[error("cannot make the TPM connection (TCTI {tcti:?}) close-on-exec: {source}")]
    CloseOnExec {
        /// The TCTI configuration string.
        tcti: String,
        /// What failed.
        source: std::io::Error,
    },
    /// A PCR index outside 0..=23, a duplicate, or an empty selection.
    #[error(transparent)]
    Selection(#[from] SelectionError),
    /// A TPM command failed.
    #[error("TPM command {command} failed: {source}")]
    Command {
        /// The TPM command (or step) that failed.
        command: &'static str,
        /// What tss-esapi reported.
        source: tss_esapi::Error,
    },
    /// The TPM refused to load the sealed object: it was sealed by another TPM, or this TPM's
    /// owner hierarchy was cleared since.
    #[error("the sealed key does not belong to this TPM (sealed by another TPM, or the TPM's owner hierarchy was cleared): {source}")]
    ForeignTpm {
        /// What tss-esapi reported for TPM2_Load.
        source: tss_esapi::Error,
    },
    /// The PCRs do not hold the values the key was sealed to: the boot chain changed.
    #[error("the boot chain differs from the one the key was sealed to: PCR {} now {} (sealed to {})", .differ.first().map_or(0, |d| d.0), .differ.first().map_or_else(String::new, |d| hex(&d.1)), .differ.first().map_or_else(String::new, |d| hex(&d.2)))]
    PcrMismatch {
        /// Every differing PCR: index, current value, value sealed to.
        differ: Vec<(u8, PcrValue, PcrValue)>,
    },
    /// The TPM refused to unseal although the PCRs read as expected (a PCR changed in
    /// between, or the blob's recorded values do not match its policy).
    #[error("the TPM refused to unseal the key (policy not satisfied): {source}")]
    PolicyFailed {
        /// What tss-esapi reported.
        source: tss_esapi::Error,
    },
    /// The TPM answered with something other than what the command returns.
    #[error("TPM command {command} returned an unexpected answer")]
    Unexpected {
        /// The TPM command.
        command: &'static str,
    },
    /// The unsealed data is not a 32-byte seed.
    #[error("the unsealed data is {len} bytes, not a 32-byte seed")]
    SeedLength {
        /// Bytes unsealed.
        len: usize,
    },
}

/// A `TPML_DIGEST` of policy digests (at most 8).
fn digest_list(digests: &[Digest]) -> Result<DigestList, TpmError> {
    let mut list = DigestList::new();
    for d in digests {
        list.add(d.clone())
            .map_err(cmd("TPM2_PolicyOR digest list"))?;
    }
    Ok(list)
}

fn slot(pcr: u8) -> Result<PcrSlot, TpmError> {
    PcrSlot::try_from(1u32 << u32::from(pcr.min(MAX_PCR))).map_err(|source| TpmError::Command {
        command: "PCR selection",
        source,
    })
}

fn pcr_handle(pcr: u8) -> Result<PcrHandle, TpmError> {
    // ESYS_TR_PCR0 is 0 and the PCR handles are consecutive.
    PcrHandle::try_from(u32::from(pcr.min(MAX_PCR))).map_err(|source| TpmError::Command {
        command: "PCR handle",
        source,
    })
}

/// The descriptors open in this process, by number, with what each points at.
fn open_fds() -> std::io::Result<BTreeMap<i32, PathBuf>> {
    let mut fds = BTreeMap::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // Gone between the listing and the link (the listing's own descriptor): skipped.
        if let Ok(target) = std::fs::read_link(entry.path()) {
            fds.insert(fd, target);
        }
    }
    Ok(fds)
}

/// Sets close-on-exec on every descriptor open now that `before` did not hold (or held
/// pointing elsewhere). One closed meanwhile (a directory listing's own) needs nothing.
fn close_on_exec_since(before: &BTreeMap<i32, PathBuf>) -> std::io::Result<()> {
    for (fd, target) in open_fds()? {
        if before.get(&fd) == Some(&target) {
            continue;
        }
        match mayfly_sandbox_proto::sys::set_cloexec(fd) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(EBADF) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `EBADF` on Linux.
const EBADF: i32 = 9;

fn cmd(command: &'static str) -> impl FnOnce(tss_esapi::Error) -> TpmError {
    move |source| TpmError::Command { command, source }
}

/// An open connection to a TPM.
pub struct Tpm {
    ctx: Context,
    tcti: String,
}

impl std::fmt::Debug for Tpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tpm({})", self.tcti)
    }
}

impl Tpm {
    /// Opens the TPM named by a TCTI string: `device:/dev/tpmrm0` (the kernel's resource
    /// manager, the appliance's default) or `swtpm:host=127.0.0.1,port=2321` (tests).
    pub fn open(tcti: &str) -> Result<Self, TpmError> {
        let open = |source| TpmError::Open {
            tcti: tcti.to_string(),
            source,
        };
        let cloexec = |source| TpmError::CloseOnExec {
            tcti: tcti.to_string(),
            source,
        };
        let conf = TctiNameConf::from_str(tcti).map_err(open)?;
        // libtss2 opens the TPM itself, without O_CLOEXEC (the `device` TCTI's `open`): the
        // descriptors that appear while the context is made get close-on-exec, so that no
        // process the agent starts inherits the TPM (a failure drops the context: closed).
        let before = open_fds().map_err(cloexec)?;
        let ctx = Context::new(conf).map_err(open)?;
        close_on_exec_since(&before).map_err(cloexec)?;
        Ok(Self {
            ctx,
            tcti: tcti.to_string(),
        })
    }

    /// The TCTI string this connection was opened with.
    pub fn tcti(&self) -> &str {
        &self.tcti
    }

    /// Reads the SHA-256 values of `pcrs` (checked and sorted by [`check_selection`]).
    pub fn read_pcrs(&mut self, pcrs: &[u8]) -> Result<Vec<(u8, PcrValue)>, TpmError> {
        let sorted = check_selection(pcrs)?;
        let mut out = Vec::with_capacity(sorted.len());
        // TPM2_PCR_Read returns at most 8 digests per call: read one PCR at a time.
        for pcr in sorted {
            let sel = PcrSelectionListBuilder::new()
                .with_selection(HashingAlgorithm::Sha256, &[slot(pcr)?])
                .build()
                .map_err(cmd("PCR selection"))?;
            let (_, _, digests) = self
                .ctx
                .execute_without_session(|c| c.pcr_read(sel))
                .map_err(cmd("TPM2_PCR_Read"))?;
            let d = digests.value().first().ok_or(TpmError::Unexpected {
                command: "TPM2_PCR_Read",
            })?;
            let value: PcrValue = d.value().try_into().map_err(|_| TpmError::Unexpected {
                command: "TPM2_PCR_Read",
            })?;
            out.push((pcr, value));
        }
        Ok(out)
    }

    /// Extends PCR `pcr`'s SHA-256 bank with `digest` (what a measuring boot loader does).
    pub fn extend_pcr(&mut self, pcr: u8, digest: &PcrValue) -> Result<(), TpmError> {
        check_selection(&[pcr])?;
        let handle = pcr_handle(pcr)?;
        let mut values = DigestValues::new();
        values.set(
            HashingAlgorithm::Sha256,
            Digest::try_from(digest.to_vec()).map_err(cmd("TPM2_PCR_Extend"))?,
        );
        self.ctx
            .execute_with_nullauth_session(|c| c.pcr_extend(handle, values))
            .map_err(cmd("TPM2_PCR_Extend"))
    }

    /// The storage primary key of the owner hierarchy (ECC P-256, AES-128-CFB, the TCG's
    /// standard SRK template): the same key from the same template every time.
    fn storage_primary(&mut self) -> Result<KeyHandle, TpmError> {
        let attrs = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_sensitive_data_origin(true)
            .with_user_with_auth(true)
            .with_no_da(true)
            .with_restricted(true)
            .with_decrypt(true)
            .build()
            .map_err(cmd("storage primary template"))?;
        let params = PublicEccParametersBuilder::new_restricted_decryption_key(
            SymmetricDefinitionObject::AES_128_CFB,
            EccCurve::NistP256,
        )
        .build()
        .map_err(cmd("storage primary template"))?;
        self.ecc_primary(attrs, params, "TPM2_CreatePrimary (storage)")
            .map(|r| r.key_handle)
    }

    /// An ECC P-256 primary of the owner hierarchy with an empty unique field: the same key
    /// from the same template on the same TPM, every time.
    fn ecc_primary(
        &mut self,
        attrs: tss_esapi::attributes::ObjectAttributes,
        params: tss_esapi::structures::PublicEccParameters,
        command: &'static str,
    ) -> Result<tss_esapi::structures::CreatePrimaryKeyResult, TpmError> {
        let public = PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::Ecc)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attrs)
            .with_ecc_parameters(params)
            .with_ecc_unique_identifier(EccPoint::default())
            .build()
            .map_err(cmd(command))?;
        self.ctx
            .execute_with_nullauth_session(|c| {
                c.create_primary(Hierarchy::Owner, public, None, None, None, None)
            })
            .map_err(cmd(command))
    }

    /// The policy digest of `TPM2_PolicyPCR` over `values`, computed by a trial session.
    fn pcr_policy(&mut self, values: &[(u8, PcrValue)]) -> Result<Digest, TpmError> {
        let session = self.policy_session(SessionType::Trial)?;
        let result = self.apply_pcr_policy(session, values).and_then(|()| {
            self.ctx
                .policy_get_digest(session)
                .map_err(cmd("TPM2_PolicyGetDigest"))
        });
        self.flush_session(session);
        result
    }

    fn policy_session(&mut self, kind: SessionType) -> Result<PolicySession, TpmError> {
        let session = self
            .ctx
            .execute_without_session(|c| {
                c.start_auth_session(
                    None,
                    None,
                    None,
                    kind,
                    SymmetricDefinition::AES_128_CFB,
                    HashingAlgorithm::Sha256,
                )
            })
            .map_err(cmd("TPM2_StartAuthSession"))?
            .ok_or(TpmError::Unexpected {
                command: "TPM2_StartAuthSession",
            })?;
        PolicySession::try_from(session).map_err(cmd("TPM2_StartAuthSession"))
    }

    fn apply_pcr_policy(
        &mut self,
        session: PolicySession,
        values: &[(u8, PcrValue)],
    ) -> Result<(), TpmError> {
        let slots = values
            .iter()
            .map(|(p, _)| slot(*p))
            .collect::<Result<Vec<_>, _>>()?;
        let sel = PcrSelectionListBuilder::new()
            .with_selection(HashingAlgorithm::Sha256, &slots)
            .build()
            .map_err(cmd("PCR selection"))?;
        let digest =
            Digest::try_from(pcr_digest(values).to_vec()).map_err(cmd("TPM2_PolicyPCR"))?;
        self.ctx
            .execute_without_session(|c| c.policy_pcr(session, digest, sel))
            .map_err(cmd("TPM2_PolicyPCR"))
    }

    fn flush_session(&mut self, session: PolicySession) {
        let handle: SessionHandle = session.into();
        let _ = self.ctx.flush_context(handle.into());
    }

    /// The policy digest of `TPM2_PolicyOR` over `branches` (2..=8 policy digests),
    /// computed by a trial session.
    fn or_policy(&mut self, branches: &[Digest]) -> Result<Digest, TpmError> {
        let list = digest_list(branches)?;
        let session = self.policy_session(SessionType::Trial)?;
        let result = self
            .ctx
            .execute_without_session(|c| c.policy_or(session, list))
            .map_err(cmd("TPM2_PolicyOR"))
            .and_then(|()| {
                self.ctx
                    .policy_get_digest(session)
                    .map_err(cmd("TPM2_PolicyGetDigest"))
            });
        self.flush_session(session);
        result
    }

    /// The `TPM2_PolicyPCR` digest of each state (one state per branch of a
    /// `TPM2_PolicyOR`).
    fn state_policies(&mut self, states: &[Vec<(u8, PcrValue)>]) -> Result<Vec<Digest>, TpmError> {
        states.iter().map(|s| self.pcr_policy(s)).collect()
    }

    /// Seals `seed` so that this TPM releases it only while the PCRs hold `values` (the
    /// current values for a key in use; an update's expected values for a re-seal).
    pub fn seal(
        &mut self,
        seed: &[u8; 32],
        values: &[(u8, PcrValue)],
        public_key: [u8; 32],
    ) -> Result<SealedBlob, TpmError> {
        self.seal_states(seed, &[values.to_vec()], public_key)
    }

    /// Seals `seed` so that this TPM releases it while the PCRs hold the values of any one
    /// of `states` (1..=[`MAX_STATES`] states of the same PCRs, ascending; a state given
    /// twice counts once): one state is a `TPM2_PolicyPCR` policy (a version-1 blob),
    /// several a `TPM2_PolicyOR` of one `TPM2_PolicyPCR` branch per state (version 2).
    pub fn seal_states(
        &mut self,
        seed: &[u8; 32],
        states: &[Vec<(u8, PcrValue)>],
        public_key: [u8; 32],
    ) -> Result<SealedBlob, TpmError> {
        let mut distinct: Vec<Vec<(u8, PcrValue)>> = Vec::with_capacity(states.len());
        for s in states {
            if !distinct.contains(s) {
                distinct.push(s.clone());
            }
        }
        let Some(first) = distinct.first().cloned() else {
            return Err(TpmError::Selection(SelectionError {
                pcrs: Vec::new(),
                reason: "no boot state to seal to",
            }));
        };
        let pcrs: Vec<u8> = first.iter().map(|(p, _)| *p).collect();
        let sorted = check_selection(&pcrs)?;
        if sorted != pcrs {
            return Err(TpmError::Selection(SelectionError {
                pcrs,
                reason: "PCR values must be given in ascending order",
            }));
        }
        if distinct.len() > MAX_STATES {
            return Err(TpmError::Selection(SelectionError {
                pcrs,
                reason: "more than 8 boot states (a TPM2_PolicyOR takes at most 8 branches)",
            }));
        }
        if distinct
            .iter()
            .any(|s| s.iter().map(|(p, _)| *p).ne(pcrs.iter().copied()))
        {
            return Err(TpmError::Selection(SelectionError {
                pcrs,
                reason: "every boot state must name the same PCRs",
            }));
        }
        let policy = if distinct.len() == 1 {
            self.pcr_policy(&first)?
        } else {
            let branches = self.state_policies(&distinct)?;
            self.or_policy(&branches)?
        };
        let attrs = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_no_da(true)
            .with_admin_with_policy(true)
            .with_user_with_auth(false)
            .build()
            .map_err(cmd("sealed object template"))?;
        let public = PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::KeyedHash)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attrs)
            .with_auth_policy(policy)
            .with_keyed_hash_parameters(PublicKeyedHashParameters::new(
                tss_esapi::structures::KeyedHashScheme::Null,
            ))
            .with_keyed_hash_unique_identifier(Digest::default())
            .build()
            .map_err(cmd("sealed object template"))?;
        let primary = self.storage_primary()?;
        let data = SensitiveData::try_from(seed.to_vec()).map_err(cmd("TPM2_Create"))?;
        let created = self
            .ctx
            .execute_with_nullauth_session(|c| {
                c.create(primary, public, None, Some(data), None, None)
            })
            .map_err(cmd("TPM2_Create (sealed seed)"));
        let _ = self.ctx.flush_context(primary.into());
        let created = created?;
        let public = created
            .out_public
            .marshall()
            .map_err(cmd("marshal TPMT_PUBLIC"))?;
        Ok(SealedBlob {
            public_key,
            pcrs: first,
            more: distinct
                .iter()
                .skip(1)
                .map(|s| s.iter().map(|(_, v)| *v).collect())
                .collect(),
            tpm_public: public,
            tpm_private: created.out_private.value().to_vec(),
        })
    }

    /// Unseals the seed of `blob`: fails with [`TpmError::ForeignTpm`] on another TPM and
    /// with [`TpmError::PcrMismatch`] when the boot chain differs from every state sealed
    /// to (naming the differences from the nearest state).
    pub fn unseal(&mut self, blob: &SealedBlob) -> Result<Zeroizing<[u8; 32]>, TpmError> {
        let pcrs: Vec<u8> = blob.pcrs.iter().map(|(p, _)| *p).collect();
        let now = self.read_pcrs(&pcrs)?;
        let states = blob.states();
        // The state the PCRs hold now, else the differences from the nearest one.
        let mut matched = None;
        let mut differ: Vec<(u8, PcrValue, PcrValue)> = Vec::new();
        for (i, state) in states.iter().enumerate() {
            let d: Vec<(u8, PcrValue, PcrValue)> = now
                .iter()
                .zip(state)
                .filter(|(a, b)| a.1 != b.1)
                .map(|(a, b)| (a.0, a.1, b.1))
                .collect();
            if d.is_empty() {
                matched = Some(i);
                break;
            }
            if differ.is_empty() || d.len() < differ.len() {
                differ = d;
            }
        }
        let public = <Public as tss_esapi::traits::UnMarshall>::unmarshall(&blob.tpm_public)
            .map_err(cmd("unmarshal TPMT_PUBLIC"))?;
        let private = tss_esapi::structures::Private::try_from(blob.tpm_private.clone())
            .map_err(cmd("TPM2B_PRIVATE"))?;
        let primary = self.storage_primary()?;
        let loaded = self
            .ctx
            .execute_with_nullauth_session(|c| c.load(primary, private, public));
        let _ = self.ctx.flush_context(primary.into());
        let object = loaded.map_err(|source| TpmError::ForeignTpm { source })?;
        let Some(matched) = matched else {
            let _ = self.ctx.flush_context(object.into());
            return Err(TpmError::PcrMismatch { differ });
        };
        let result = self.unseal_loaded(object.into(), &states, matched);
        let _ = self.ctx.flush_context(object.into());
        result
    }

    /// Satisfies the blob's policy for state `matched` (its `TPM2_PolicyPCR`, then with
    /// several states the `TPM2_PolicyOR` of every state's branch) and unseals.
    fn unseal_loaded(
        &mut self,
        object: ObjectHandle,
        states: &[Vec<(u8, PcrValue)>],
        matched: usize,
    ) -> Result<Zeroizing<[u8; 32]>, TpmError> {
        let values = states.get(matched).ok_or(TpmError::Unexpected {
            command: "state selection",
        })?;
        let branches = if states.len() > 1 {
            Some(self.state_policies(states)?)
        } else {
            None
        };
        let session = self.policy_session(SessionType::Policy)?;
        let result = self
            .apply_pcr_policy(session, values)
            .and_then(|()| match &branches {
                Some(b) => {
                    let list = digest_list(b)?;
                    self.ctx
                        .execute_without_session(|c| c.policy_or(session, list))
                        .map_err(cmd("TPM2_PolicyOR"))
                }
                None => Ok(()),
            })
            .map_err(|e| match e {
                TpmError::Command { source, .. } => TpmError::PolicyFailed { source },
                other => other,
            })
            .and_then(|()| {
                self.ctx
                    .execute_with_session(Some(session.into()), |c| c.unseal(object))
                    .map_err(|source| TpmError::PolicyFailed { source })
            });
        self.flush_session(session);
        let data = result?;
        let bytes = Zeroizing::new(data.value().to_vec());
        let mut seed = Zeroizing::new([0u8; 32]);
        if bytes.len() != 32 {
            return Err(TpmError::SeedLength { len: bytes.len() });
        }
        seed.copy_from_slice(&bytes);
        Ok(seed)
    }

    /// The attestation key: a restricted ECDSA P-256 / SHA-256 signing primary of the owner
    /// hierarchy. The same template gives the same key on the same TPM every boot, so its
    /// public key can be recorded once and pinned.
    fn attestation_key(&mut self) -> Result<(KeyHandle, [u8; 65]), TpmError> {
        let attrs = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_sensitive_data_origin(true)
            .with_user_with_auth(true)
            .with_no_da(true)
            .with_restricted(true)
            .with_sign_encrypt(true)
            .build()
            .map_err(cmd("attestation key template"))?;
        let params = PublicEccParametersBuilder::new()
            .with_ecc_scheme(EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)))
            .with_curve(EccCurve::NistP256)
            .with_is_signing_key(true)
            .with_is_decryption_key(false)
            .with_restricted(true)
            .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
            .build()
            .map_err(cmd("attestation key template"))?;
        let created = self.ecc_primary(attrs, params, "TPM2_CreatePrimary (attestation key)")?;
        let point = match &created.out_public {
            Public::Ecc { unique, .. } => quote::uncompressed_point(unique),
            _ => None,
        };
        match point {
            Some(p) => Ok((created.key_handle, p)),
            None => {
                let _ = self.ctx.flush_context(created.key_handle.into());
                Err(TpmError::Unexpected {
                    command: "TPM2_CreatePrimary (attestation key)",
                })
            }
        }
    }

    /// The attestation key's public key (uncompressed SEC1 point, 65 bytes).
    pub fn attestation_public_key(&mut self) -> Result<[u8; 65], TpmError> {
        let (handle, point) = self.attestation_key()?;
        let _ = self.ctx.flush_context(handle.into());
        Ok(point)
    }

    /// A quote over `pcrs` (SHA-256 bank) with `qualifying` as its extra data (at most 64
    /// bytes; Mayfly passes a 32-byte SHA-256).
    pub fn quote(&mut self, pcrs: &[u8], qualifying: &[u8; 32]) -> Result<Quote, TpmError> {
        let sorted = check_selection(pcrs)?;
        let slots = sorted
            .iter()
            .map(|p| slot(*p))
            .collect::<Result<Vec<_>, _>>()?;
        let sel = PcrSelectionListBuilder::new()
            .with_selection(HashingAlgorithm::Sha256, &slots)
            .build()
            .map_err(cmd("PCR selection"))?;
        let values = self.read_pcrs(&sorted)?;
        let (ak, public_key) = self.attestation_key()?;
        let data = Data::try_from(qualifying.to_vec()).map_err(cmd("TPM2_Quote"))?;
        let scheme = SignatureScheme::EcDsa {
            hash_scheme: HashScheme::new(HashingAlgorithm::Sha256),
        };
        let result = self
            .ctx
            .execute_with_nullauth_session(|c| c.quote(ak, data, scheme, sel));
        let _ = self.ctx.flush_context(ak.into());
        let (attest, signature) = result.map_err(cmd("TPM2_Quote"))?;
        let attest = attest.marshall().map_err(cmd("marshal TPMS_ATTEST"))?;
        let signature = quote::fixed_signature(&signature).ok_or(TpmError::Unexpected {
            command: "TPM2_Quote",
        })?;
        Ok(Quote {
            public_key,
            attest,
            signature,
            pcrs: values,
        })
    }
}
