{{/*
Chart name, truncated to the 63 characters Kubernetes allows in a DNS label.
*/}}
{{- define "helios-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: release name + chart name (once, when the release already contains it).
*/}}
{{- define "helios-serve.fullname" -}}
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

{{- define "helios-serve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "helios-serve.labels" -}}
helm.sh/chart: {{ include "helios-serve.chart" . }}
{{ include "helios-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: helios-serve
{{- end }}

{{/*
Selector labels (immutable on a Deployment: keep them minimal).
*/}}
{{- define "helios-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "helios-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "helios-serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "helios-serve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference: repository[:tag][@digest]; the tag defaults to "<appVersion>-<flavor>".
*/}}
{{- define "helios-serve.image" -}}
{{- $tag := default (printf "%s-%s" .Chart.AppVersion .Values.image.flavor) .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{- define "helios-serve.testImage" -}}
{{- if .Values.tests.image.repository }}
{{- printf "%s:%s" .Values.tests.image.repository (required "tests.image.tag is required with tests.image.repository" .Values.tests.image.tag) }}
{{- else }}
{{- include "helios-serve.image" . }}
{{- end }}
{{- end }}

{{/*
The app's config as TOML. Helm hands numbers to templates as float64 and toToml writes them as "8000.0";
whole numbers are turned back into TOML integers (float settings accept integers).
*/}}
{{- define "helios-serve.configToml" -}}
{{- $toml := toToml .Values.config }}
{{- if hasPrefix "toml:" $toml }}
{{- fail (printf "config cannot be written as TOML: %s (note: arrays must not mix types)" $toml) }}
{{- end }}
{{- regexReplaceAll "(?m)^(\\s*[A-Za-z0-9_-]+ = -?[0-9]+)\\.0$" $toml "${1}" }}
{{- end }}

{{/*
Port the container listens on (config.server.port, default 8000).
*/}}
{{- define "helios-serve.containerPort" -}}
{{- $server := .Values.config.server | default dict }}
{{- $port := 8000 }}
{{- if hasKey $server "port" }}{{ $port = $server.port }}{{ end }}
{{- $port | int }}
{{- end }}

{{- define "helios-serve.gracefulTimeout" -}}
{{- $server := .Values.config.server | default dict }}
{{- $timeout := 30 }}
{{- if hasKey $server "graceful_timeout" }}{{ $timeout = $server.graceful_timeout }}{{ end }}
{{- $timeout | float64 | ceil | int }}
{{- end }}

{{- define "helios-serve.terminationGracePeriodSeconds" -}}
{{- $graceful := include "helios-serve.gracefulTimeout" . | int }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $graceful 15 }}
{{- else }}
{{- $tgps := .Values.terminationGracePeriodSeconds | int }}
{{- if le $tgps $graceful }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be greater than config.server.graceful_timeout (%d)" $tgps $graceful) }}
{{- end }}
{{- $tgps }}
{{- end }}
{{- end }}

{{/*
Whether client auth is on, and where the keys come from.
*/}}
{{- define "helios-serve.authEnabled" -}}
{{- if or .Values.auth.apiKeys .Values.auth.existingSecret }}true{{ end }}
{{- end }}

{{- define "helios-serve.authSecretName" -}}
{{- default (include "helios-serve.fullname" .) .Values.auth.existingSecret }}
{{- end }}

{{- define "helios-serve.authSecretKey" -}}
{{- if .Values.auth.existingSecret }}{{ .Values.auth.existingSecretKey }}{{ else }}helios_auth__api_keys{{ end }}
{{- end }}

{{/*
Whether the chart renders its own Secret (inline client keys and/or inline provider keys).
*/}}
{{- define "helios-serve.createSecret" -}}
{{- if or (and .Values.auth.apiKeys (not .Values.auth.existingSecret)) (and .Values.providerKeys (not .Values.providerKeysExistingSecret)) }}true{{ end }}
{{- end }}

{{/*
Whether some model uses the embedded engine.
*/}}
{{- define "helios-serve.hasEmbeddedModel" -}}
{{- range (.Values.config.models | default list) }}
{{- if and (kindIs "map" .) (eq (toString (index . "backend")) "vllm") }}true{{ end }}
{{- end }}
{{- end }}

{{/*
Cross-field checks the JSON schema cannot express; they fail `helm install/template` with a clear message.
*/}}
{{- define "helios-serve.validate" -}}
{{- if and .Values.auth.apiKeys .Values.auth.existingSecret }}
{{- fail "set auth.apiKeys or auth.existingSecret, not both" }}
{{- end }}
{{- if and .Values.providerKeys .Values.providerKeysExistingSecret }}
{{- fail "set providerKeys or providerKeysExistingSecret, not both" }}
{{- end }}
{{- $auth := .Values.config.auth | default dict }}
{{- if (index $auth "api_keys") }}
{{- fail "config.auth.api_keys must stay empty (the ConfigMap is not secret): use auth.apiKeys or auth.existingSecret" }}
{{- end }}
{{- if and .Values.gpu.enabled (ne .Values.image.flavor "gpu") (not .Values.image.tag) }}
{{- fail (printf "gpu.enabled needs image.flavor=gpu (got %q), or an explicit image.tag" .Values.image.flavor) }}
{{- end }}
{{- if include "helios-serve.hasEmbeddedModel" . }}
{{- if and (eq .Values.image.flavor "gateway") (not .Values.image.tag) }}
{{- fail "a model with backend \"vllm\" needs the embedded engine: set image.flavor to cpu or gpu (the gateway image serves remote providers only)" }}
{{- end }}
{{- $server := .Values.config.server | default dict }}
{{- if gt (index $server "workers" | default 1 | int) 1 }}
{{- fail "a model with backend \"vllm\" needs config.server.workers = 1" }}
{{- end }}
{{- end }}
{{- if and .Values.autoscaling.enabled (lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas)) }}
{{- fail "autoscaling.maxReplicas must be >= autoscaling.minReplicas" }}
{{- end }}
{{- end }}

{{/*
PromQL matchers selecting this release's series.
*/}}
{{- define "helios-serve.promSelector" -}}
{{- if .Values.metrics.prometheusRule.selector }}
{{- .Values.metrics.prometheusRule.selector }}
{{- else }}
{{- printf "job=%q,namespace=%q" (include "helios-serve.fullname" .) .Release.Namespace }}
{{- end }}
{{- end }}
