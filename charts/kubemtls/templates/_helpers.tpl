{{/*
kubemtls.name: the chart name, or nameOverride. Truncated to 63 characters because some
Kubernetes name fields (labels, DNS-1123 labels) are limited to that.
*/}}
{{- define "kubemtls.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
kubemtls.fullname: the Deployment, Service and ServiceAccount name. The Service name is
also KUBEMTLS_OPERATOR_SERVICE, so it ends up in the serving certificate's DNS names.
If the release name already contains the chart name it is used as is ("kubemtls", not
"kubemtls-kubemtls"). Truncated to 63 characters (DNS-1123 label: a Service name).
*/}}
{{- define "kubemtls.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
kubemtls.chart: chart name and version, for the helm.sh/chart label.
*/}}
{{- define "kubemtls.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
kubemtls.labels: the common labels on every object the chart renders.
*/}}
{{- define "kubemtls.labels" -}}
helm.sh/chart: {{ include "kubemtls.chart" . }}
{{ include "kubemtls.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubemtls
{{- end }}

{{/*
kubemtls.selectorLabels: the immutable subset that selects the operator pods (Deployment
selector, Service, PodDisruptionBudget, anti-affinity). Never add a label here that can
change between upgrades: a Deployment's selector cannot be changed in place.
*/}}
{{- define "kubemtls.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubemtls.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
kubemtls.serviceAccountName: the operator's ServiceAccount (created, or named by values).
*/}}
{{- define "kubemtls.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubemtls.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create=false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
kubemtls.webhookConfigName: the MutatingWebhookConfiguration's name. The operator gets it
as KUBEMTLS_OPERATOR_WEBHOOK_CONFIG (it patches the caBundle in) and RBAC names it in
resourceNames, so the operator can patch this one configuration and no other.
*/}}
{{- define "kubemtls.webhookConfigName" -}}
{{- printf "%s-injector" (include "kubemtls.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
kubemtls.caSecretName: the CA Secret in the release namespace (KUBEMTLS_OPERATOR_CA_SECRET
and the only Secret RBAC lets the operator read or write).
*/}}
{{- define "kubemtls.caSecretName" -}}
{{- if eq .Values.ca.mode "existingSecret" }}
{{- .Values.ca.existingSecret }}
{{- else }}
{{- printf "%s-ca" (include "kubemtls.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/*
kubemtls.peeringName: the ClusterKopfPeering object the replicas share; empty when
peering is off (KUBEMTLS_OPERATOR_PEERING empty = standalone).
*/}}
{{- define "kubemtls.peeringName" -}}
{{- if .Values.peering.enabled }}
{{- default (include "kubemtls.fullname" .) .Values.peering.name }}
{{- end }}
{{- end }}

{{/*
kubemtls.image: "repository:tag" or "repository@digest" of an image values block; the tag
defaults to the chart's appVersion. Called with (dict "image" .Values.image "root" .).
*/}}
{{- define "kubemtls.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{/*
kubemtls.signerURL: the signing API URL sidecars are given (values.signerURL, or the
Service's in-cluster name on the signer port).
*/}}
{{- define "kubemtls.signerURL" -}}
{{- if .Values.signerURL }}
{{- .Values.signerURL }}
{{- else }}
{{- printf "https://%s.%s.svc:%d" (include "kubemtls.fullname" .) .Release.Namespace (include "kubemtls.port.signer" . | int) }}
{{- end }}
{{- end }}

{{/*
Ports: the contract (sidecar/kubemtls_sidecar/contract.py, DESIGN.md "Ports"). They are
not values: the operator, the Service, the probes and the webhook configuration must agree,
and tests/chart checks these against the contract module.
*/}}
{{- define "kubemtls.port.webhook" -}}9443{{- end }}
{{- define "kubemtls.port.signer" -}}9444{{- end }}
{{- define "kubemtls.port.metrics" -}}9090{{- end }}
{{- define "kubemtls.port.health" -}}8080{{- end }}
{{- define "kubemtls.port.sidecarAdmin" -}}15020{{- end }}
{{/* The path kopf serves the handler with id "inject" at (contract.WEBHOOK_HANDLER_ID). */}}
{{- define "kubemtls.webhookPath" -}}/inject{{- end }}
