//! The control plane's certificates, made fresh for every start: one CA that signs
//! the API server's serving certificate and every client-certificate user, and the
//! key that signs service-account tokens.

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// The OID of X.520 `organizationName`, which Kubernetes reads as a group.
const ORGANIZATION_OID: [u64; 4] = [2, 5, 4, 10];

/// A certificate and its private key, both PEM.
#[derive(Clone, Debug)]
pub struct CertifiedKey {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The cluster CA: `--client-ca-file` for users, and the trust root in kubeconfigs.
pub struct CertificateAuthority {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    pub fn generate(common_name: &str) -> Result<Self> {
        let key = KeyPair::generate().context("generating the CA key")?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name, &[])?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).context("self-signing the CA")?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A serving certificate valid for every name in `sans` (IP addresses allowed).
    pub fn issue_server(&self, common_name: &str, sans: &[&str]) -> Result<CertifiedKey> {
        let sans: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
        let mut params = CertificateParams::new(sans).context("serving certificate names")?;
        params.distinguished_name = name(common_name, &[])?;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate the API server authenticates as user `user` in
    /// `groups` (CN is the user, each O a group).
    pub fn issue_client(&self, user: &str, groups: &[&str]) -> Result<CertifiedKey> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(user, groups)?;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Result<CertifiedKey> {
        let key = KeyPair::generate().context("generating a certificate key")?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("signing a certificate with the cluster CA")?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The service-account token signing key, as the private key (for the API server's
/// `--service-account-signing-key-file` and the controller-manager) and the public
/// key (for `--service-account-key-file`).
pub struct ServiceAccountKey {
    pub private_pem: String,
    pub public_pem: String,
}

impl ServiceAccountKey {
    pub fn generate() -> Result<Self> {
        let key = KeyPair::generate().context("generating the service-account key")?;
        Ok(Self {
            private_pem: key.serialize_pem(),
            public_pem: key.public_key_pem(),
        })
    }
}

/// A subject with CN `common_name` and one O per group. rcgen keeps one value per
/// attribute type, so a second group is carried by the same OID spelled as a
/// custom type; Kubernetes reads every O either way.
fn name(common_name: &str, groups: &[&str]) -> Result<DistinguishedName> {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    match groups {
        [] => {}
        [one] => dn.push(DnType::OrganizationName, *one),
        [one, two] => {
            dn.push(DnType::OrganizationName, *one);
            dn.push(DnType::CustomDnType(ORGANIZATION_OID.to_vec()), *two);
        }
        more => bail!(
            "a client certificate here carries at most two groups, {} were asked for ({}); \
             bind the roles to the user instead, or impersonate",
            more.len(),
            more.join(", ")
        ),
    }
    Ok(dn)
}
