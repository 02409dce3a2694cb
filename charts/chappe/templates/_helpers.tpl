{{/*
Names and labels, as nats-io/k8s and scylla-operator's charts do.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "chappe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* RELEASE-NAME, or the release name alone when it holds the chart name; at most 63 characters. */}}
{{- define "chappe.fullname" -}}
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

{{/* name-version, for the helm.sh/chart label. */}}
{{- define "chappe.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select pods: name and instance (callers add component). */}}
{{- define "chappe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chappe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The full label set, without component (see chappe.componentLabels). */}}
{{- define "chappe.labels" -}}
helm.sh/chart: {{ include "chappe.chart" . }}
{{ include "chappe.selectorLabels" . }}
app.kubernetes.io/version: {{ include "chappe.imageTag" . | replace "+" "_" | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: chappe
{{- end }}

{{/* The full label set of one component: (dict "root" $ "component" "operator"). */}}
{{- define "chappe.componentLabels" -}}
{{ include "chappe.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Selector labels of one component. */}}
{{- define "chappe.componentSelectorLabels" -}}
{{ include "chappe.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The image tag: image.tag or the chart's appVersion. */}}
{{- define "chappe.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{/* The image repository, which must be set. */}}
{{- define "chappe.imageRepository" -}}
{{- required "image.repository is required: the Chappe image built from the Dockerfile at the repository root, e.g. --set image.repository=registry.example.gouv.fr/chappe/chappe" .Values.image.repository }}
{{- end }}

{{/* repository:tag. */}}
{{- define "chappe.image" -}}
{{- printf "%s:%s" (include "chappe.imageRepository" .) (include "chappe.imageTag" .) }}
{{- end }}

{{/* The operator's ServiceAccount. */}}
{{- define "chappe.operatorServiceAccount" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "chappe.operatorName" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Namespace of the platform. */}}
{{- define "chappe.platformNamespace" -}}
{{- default .Release.Namespace .Values.platform.namespace }}
{{- end }}

{{/* Regions whose gateways serve (not draining). */}}
{{- define "chappe.servingRegions" -}}
{{- $out := list }}
{{- range .Values.platform.regions }}
{{- if not .draining }}
{{- $out = append $out .name }}
{{- end }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/* The gRPC URL of one region's gateways: (dict "root" $ "region" "fr-par"). */}}
{{- define "chappe.gatewayUrl" -}}
{{- printf "http://%s-%s-gateway.%s.svc:7443" .root.Values.platform.name .region (include "chappe.platformNamespace" .root) }}
{{- end }}

{{/* Pod security context shared by the chart's pods. */}}
{{- define "chappe.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container security context shared by the chart's containers. */}}
{{- define "chappe.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Name of the operator's objects: FULLNAME-operator, or FULLNAME when it already says operator. */}}
{{- define "chappe.operatorName" -}}
{{- $full := include "chappe.fullname" . }}
{{- if hasSuffix "operator" $full }}
{{- $full }}
{{- else }}
{{- printf "%s-operator" ($full | trunc 54 | trimSuffix "-") }}
{{- end }}
{{- end }}
