{{/*
Names and labels shared by every template. Label keys follow
https://helm.sh/docs/chart_best_practices/labels (reference/grpc-python.md §6.3).
*/}}

{{- define "hyperbroker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release-scoped base name; object names add -broker, -agent, ... to it. */}}
{{- define "hyperbroker.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 48 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "hyperbroker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "hyperbroker.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Labels common to every object. */}}
{{- define "hyperbroker.labels" -}}
helm.sh/chart: {{ include "hyperbroker.chart" . }}
app.kubernetes.io/name: {{ include "hyperbroker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: hyperbroker
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of the broker pods: stable across upgrades, so never the version. */}}
{{- define "hyperbroker.broker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hyperbroker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: broker
{{- end }}

{{- define "hyperbroker.agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hyperbroker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
{{- end }}

{{- define "hyperbroker.broker.serviceAccountName" -}}
{{- if .Values.broker.serviceAccount.create }}
{{- default (printf "%s-broker" (include "hyperbroker.fullname" .)) .Values.broker.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.broker.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "hyperbroker.agent.serviceAccountName" -}}
{{- if .Values.agent.serviceAccount.create }}
{{- default (printf "%s-agent" (include "hyperbroker.fullname" .)) .Values.agent.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.agent.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "hyperbroker.policyConfigMap" -}}
{{- default (printf "%s-policy" (include "hyperbroker.fullname" .)) .Values.policy.existingConfigMap }}
{{- end }}

{{/* The headless Service's DNS name: it resolves to every ready broker pod. */}}
{{- define "hyperbroker.broker.headlessHost" -}}
{{- printf "%s-broker-headless.%s.svc.%s" (include "hyperbroker.fullname" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{- define "hyperbroker.broker.serviceHost" -}}
{{- printf "%s-broker.%s.svc.%s" (include "hyperbroker.fullname" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{- define "hyperbroker.agent.brokerAddress" -}}
{{- default (printf "%s:%v" (include "hyperbroker.broker.headlessHost" .) .Values.broker.port) .Values.agent.brokerAddress }}
{{- end }}

{{/*
The action of the broker's probes. kubelet's native gRPC probe calls grpc.health.v1 Check for
the service name in plaintext only (it takes no TLS parameters), and its port must be a number.
Under mTLS the broker serves health alone, in plaintext, on healthPort (--health-listen).
*/}}
{{- define "hyperbroker.broker.probeAction" -}}
grpc:
  port: {{ if .Values.tls.enabled }}{{ .Values.broker.healthPort }}{{ else }}{{ .Values.broker.port }}{{ end }}
  service: hyperbroker.v1.Broker
{{- end }}

{{/* The broker's TLS Secret: the one named, or the one cert-manager fills for the chart. */}}
{{- define "hyperbroker.broker.tlsSecret" -}}
{{- default (printf "%s-broker-tls" (include "hyperbroker.fullname" .)) .Values.tls.secretName }}
{{- end }}

{{/* Checks that hold for any values; they fail the render with the reason. */}}
{{- define "hyperbroker.validate" -}}
{{- if and (gt (int .Values.broker.replicas) 1) (not .Values.broker.store.redisUrl) }}
{{- fail "broker.replicas > 1 needs broker.store.redisUrl: replicas share their state through Redis; the SQLite store lives on one ReadWriteOnce volume of one pod (docs/operations.md, \"State store\")" }}
{{- end }}
{{- if and .Values.broker.store.redisUrl (regexMatch "://[^/@]*:[^/@]*@" .Values.broker.store.redisUrl) }}
{{- fail "broker.store.redisUrl must not hold a password: put it in a Secret named by broker.store.passwordSecret.name" }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) }}
{{- if not (.Capabilities.APIVersions.Has "cert-manager.io/v1") }}
{{- fail "tls.enabled (the default) needs tls.secretName (a kubernetes.io/tls Secret with tls.crt, tls.key and ca.crt) or cert-manager in the cluster; tls.enabled=false only for a trusted test network" }}
{{- end }}
{{- if not .Values.tls.certManager.issuerRef.name }}
{{- fail "tls.enabled without tls.secretName asks cert-manager for the broker certificate: set tls.certManager.issuerRef.name" }}
{{- end }}
{{- end }}
{{- if and (not .Values.policy.existingConfigMap) (not .Values.policy.content) }}
{{- fail "set policy.content or policy.existingConfigMap: the broker does not start without a policy" }}
{{- end }}
{{- if lt (int .Values.broker.workers) 1 }}
{{- fail "broker.workers must be at least 1" }}
{{- end }}
{{- end }}
