{{/*
kubemtls.validate: fail fast, with a sentence that says what to change, on values that
contradict each other. values.schema.json already refuses unknown keys and wrong types;
this covers what a schema cannot see. Included once, from NOTES.txt and the Deployment.
*/}}
{{- define "kubemtls.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.peering.enabled) }}
{{- fail "replicaCount > 1 needs peering.enabled=true: without kopf peering every replica would run the handlers and they would fight over the same MTLSCerts" }}
{{- end }}
{{- if and (eq .Values.webhook.failurePolicy "Fail") (not .Values.webhook.objectSelector) }}
{{- fail "webhook.failurePolicy=Fail needs webhook.objectSelector=true: otherwise every pod creation in the cluster depends on the operator being up. Label opted-in pods kubemtls.io/inject=true and set both, or keep failurePolicy=Ignore" }}
{{- end }}
{{- if eq .Values.ca.mode "existingSecret" }}
{{- if not .Values.ca.existingSecret }}
{{- fail "ca.mode=existingSecret needs ca.existingSecret: the name of a Secret in the release namespace with tls.crt and tls.key (docs/ca.md)" }}
{{- end }}
{{- else if .Values.ca.existingSecret }}
{{- fail (printf "ca.existingSecret is set but ca.mode=%s ignores it: set ca.mode=existingSecret, or remove ca.existingSecret" .Values.ca.mode) }}
{{- end }}
{{- if and (eq .Values.ca.mode "certManager") (not .Values.ca.certManager.issuerRef.name) }}
{{- fail "ca.mode=certManager needs ca.certManager.issuerRef.name: the cert-manager Issuer or ClusterIssuer that signs kubemtls's CA (docs/ca.md)" }}
{{- end }}
{{- if and .Values.sidecar.native (semverCompare "<1.29.0-0" .Capabilities.KubeVersion.Version) }}
{{- fail (printf "sidecar.native=true needs Kubernetes 1.29 or newer (native sidecar containers) and this cluster is %s: set sidecar.native=false" .Capabilities.KubeVersion.Version) }}
{{- end }}
{{- if and .Values.networkPolicy.enabled (not .Values.networkPolicy.namespaces) }}
{{- fail "networkPolicy.enabled=true needs networkPolicy.namespaces: the namespaces whose injected pods it protects" }}
{{- end }}
{{- if and .Values.networkPolicy.enabled (not .Values.networkPolicy.tlsPorts) }}
{{- fail "networkPolicy.enabled=true needs networkPolicy.tlsPorts: with none, the policy would refuse all traffic to injected pods" }}
{{- end }}
{{- if and (not .Values.serviceAccount.create) (not .Values.serviceAccount.name) }}
{{- fail "serviceAccount.create=false needs serviceAccount.name: the existing ServiceAccount the operator runs as" }}
{{- end }}
{{- end }}
