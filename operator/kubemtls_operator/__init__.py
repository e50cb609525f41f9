"""kubemtls operator: certificates, signing API, trust bundles and the injection webhook."""
