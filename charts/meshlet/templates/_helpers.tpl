{{/*
Named templates shared by the chart's manifests.

The injector's names are fixed rather than derived from the release name: the
webhook serving certificate is issued for meshlet-injector.<ns>.svc, and the
proxies and docs refer to these names (DESIGN.md).
*/}}

{{/* Name of the injector's Deployment, Service, ServiceAccount and RBAC objects. */}}
{{- define "meshlet.injector.name" -}}
meshlet-injector
{{- end }}

{{/* Secret with the webhook serving certificate (kubernetes.io/tls plus ca.crt). */}}
{{- define "meshlet.webhook.secretName" -}}
meshlet-injector-tls
{{- end }}

{{/* Secret in which the identity issuer keeps its CA (created by the injector, not by the chart). */}}
{{- define "meshlet.identity.caSecretName" -}}
{{- .Values.identity.caSecret | default "meshlet-identity-ca" -}}
{{- end }}

{{/* host:port proxies dial for the mesh endpoint (identity issuer, config). */}}
{{- define "meshlet.controlPlane.address" -}}
{{- if .Values.controlPlane.address -}}
{{- .Values.controlPlane.address -}}
{{- else if .Values.injector.service.clusterIP -}}
{{- if contains ":" .Values.injector.service.clusterIP -}}
[{{ .Values.injector.service.clusterIP }}]:15012
{{- else -}}
{{ .Values.injector.service.clusterIP }}:15012
{{- end -}}
{{- else -}}
{{ include "meshlet.injector.name" . }}.{{ .Release.Namespace }}.svc:15012
{{- end -}}
{{- end }}

{{/* ConfigMap with the mesh defaults the injector applies to pods. */}}
{{- define "meshlet.config.name" -}}
meshlet-config
{{- end }}

{{/* DNS name the API server uses to reach the webhook; the serving certificate must match it. */}}
{{- define "meshlet.webhook.host" -}}
{{ include "meshlet.injector.name" . }}.{{ .Release.Namespace }}.svc
{{- end }}

{{/* Chart label value, e.g. meshlet-0.1.0 (+ is not allowed in label values). */}}
{{- define "meshlet.chart" -}}
{{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "meshlet.labels" -}}
helm.sh/chart: {{ include "meshlet.chart" . }}
app.kubernetes.io/part-of: meshlet
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selector labels of the injector pods (stable across upgrades: selectors are immutable). */}}
{{- define "meshlet.injector.selectorLabels" -}}
app.kubernetes.io/name: meshlet-injector
app.kubernetes.io/component: injector
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* All labels of the injector's objects. */}}
{{- define "meshlet.injector.labels" -}}
{{ include "meshlet.labels" . }}
app.kubernetes.io/name: meshlet-injector
app.kubernetes.io/component: injector
{{- end }}

{{/* "repository:tag" with the tag defaulting to the chart's appVersion. Call with (dict "image" .Values.x.image "root" $). */}}
{{- define "meshlet.image" -}}
{{ printf "%s:%s" .image.repository (.image.tag | default .root.Chart.AppVersion) }}
{{- end }}

{{/* Proxy image reference. */}}
{{- define "meshlet.proxy.image" -}}
{{ include "meshlet.image" (dict "image" .Values.proxy.image "root" .) }}
{{- end }}

{{/* Init image reference; falls back to the proxy image, which holds both binaries. */}}
{{- define "meshlet.proxyInit.image" -}}
{{- $repo := .Values.proxyInit.image.repository | default .Values.proxy.image.repository -}}
{{- $tag := .Values.proxyInit.image.tag | default .Values.proxy.image.tag | default .Chart.AppVersion -}}
{{ printf "%s:%s" $repo $tag }}
{{- end }}

{{/* Injector image reference. */}}
{{- define "meshlet.injector.image" -}}
{{ include "meshlet.image" (dict "image" .Values.injector.image "root" .) }}
{{- end }}

{{/*
Native sidecar decision: "auto" follows the cluster version (SidecarContainers
is on by default from 1.29), so the same values work on old and new clusters.
Renders "true" or "false".
*/}}
{{- define "meshlet.proxy.nativeSidecar" -}}
{{- $v := .Values.proxy.nativeSidecar -}}
{{- if eq (toString $v) "auto" -}}
{{ semverCompare ">=1.29.0-0" .Capabilities.KubeVersion.Version }}
{{- else -}}
{{ $v }}
{{- end -}}
{{- end }}

{{/*
Resources block that omits empty requests or limits (as istiod.resources does),
so that `limits: {}` in values removes limits instead of rendering an empty map.
*/}}
{{- define "meshlet.resources" -}}
{{- if .requests }}
requests:
  {{- toYaml .requests | nindent 2 }}
{{- end }}
{{- if .limits }}
limits:
  {{- toYaml .limits | nindent 2 }}
{{- end }}
{{- end }}

{{/* Namespaces the webhook never touches: kube-system, the control plane's own, and any extra ones. */}}
{{- define "meshlet.webhook.excludedNamespaces" -}}
{{- $ns := list "kube-system" "meshlet-system" .Release.Namespace -}}
{{- $ns = concat $ns .Values.webhook.excludeNamespaces -}}
{{ toYaml ($ns | uniq) }}
{{- end }}

{{/*
Arguments of `meshlet-injector serve`. The injection defaults are flags of the
injector (injector/src/config.rs DefaultsArgs; an empty value omits the field; scripts/test-chart.sh starts the real binary with these args), so that it
needs no API access to learn them; the same values are in the meshlet-config
ConfigMap for the settings the injector does not take as flags yet.
*/}}
{{- define "meshlet.injector.args" -}}
{{- $r := .Values.proxy.resources | default dict -}}
{{- $req := $r.requests | default dict -}}
{{- $lim := $r.limits | default dict -}}
- serve
- --addr=0.0.0.0:8443
- --tls-cert=/etc/meshlet/tls/tls.crt
- --tls-key=/etc/meshlet/tls/tls.key
- --proxy-image={{ include "meshlet.proxy.image" . }}
- --init-image={{ include "meshlet.proxyInit.image" . }}
- --image-pull-policy={{ .Values.proxy.image.pullPolicy }}
- --proxy-cpu={{ $req.cpu | default "" }}
- --proxy-memory={{ $req.memory | default "" }}
- --proxy-cpu-limit={{ $lim.cpu | default "" }}
- --proxy-memory-limit={{ $lim.memory | default "" }}
- --proxy-log-level={{ .Values.proxy.logLevel }}
- --native-sidecar={{ include "meshlet.proxy.nativeSidecar" . }}
- --proxy-tls-mode={{ .Values.proxy.tlsMode }}
- --default-inbound-policy={{ .Values.defaultInboundPolicy }}
- --identity={{ .Values.identity.enabled }}
{{- if .Values.identity.enabled }}
- --mesh-addr=0.0.0.0:15012
- --service={{ include "meshlet.injector.name" . }}
- --trust-domain={{ .Values.trustDomain }}
- --cert-lifetime={{ .Values.identity.certLifetime }}
- --ca-secret={{ include "meshlet.identity.caSecretName" . }}
- --ca-secret-create={{ empty .Values.identity.caSecret }}
- --control-plane-address={{ include "meshlet.controlPlane.address" . }}
- --control-plane-name={{ include "meshlet.injector.name" . }}.{{ .Release.Namespace }}.svc
{{- end }}
{{- if not ((.Values.injector.controller | default dict).enabled | default false) }}
- --no-controller
{{- end }}
{{- end }}

{{/*
Fields shared by both webhooks. Call with (dict "root" $ "caCert" PEM); an
empty caCert (cert-manager) leaves caBundle for cert-manager's CA injector.
*/}}
{{- define "meshlet.webhook.common" -}}
{{- $root := .root -}}
admissionReviewVersions: ["v1"]
sideEffects: None
failurePolicy: {{ $root.Values.webhook.failurePolicy }}
timeoutSeconds: {{ $root.Values.webhook.timeoutSeconds }}
matchPolicy: Equivalent
# The injector is idempotent, so a second call after another webhook changed
# the pod (e.g. added a container) is safe and injects what is new.
reinvocationPolicy: IfNeeded
clientConfig:
  service:
    name: {{ include "meshlet.injector.name" $root }}
    namespace: {{ $root.Release.Namespace }}
    path: /mutate
    port: 443
  {{- with .caCert }}
  caBundle: {{ b64enc . }}
  {{- end }}
rules:
  - operations: ["CREATE"]
    apiGroups: [""]
    apiVersions: ["v1"]
    resources: ["pods"]
    scope: Namespaced
{{- end }}
