{{/*
wsproxy chart helpers.

Every helper takes this chart's context. From a chart that depends on wsproxy, pass the
subchart's context, `.Subcharts.wsproxy` (Helm 3.7+), so that `.Values` are wsproxy's
values (this chart's defaults merged with the parent's `wsproxy:` block) and `.Chart` is
this chart. The public ones, for a parent chart's pod template:

  wsproxy.sidecar                   the wsproxy container, one list item for `containers:`
  wsproxy.sidecarVolumes            its volumes, list items for `volumes:`
  wsproxy.podAnnotations            checksum/wsproxy-config (+ prometheus.io/* if enabled)
  wsproxy.terminationGracePeriodSeconds
                                    a number larger than the drain can take
  wsproxy.appLifecycle              a `lifecycle:` body for the application container that
                                    keeps it up while wsproxy drains
  wsproxy.configMap                 the ConfigMap manifest (rendered by this chart already)

Example (charts/examples/api-manager/templates/deployment.yaml):

  template:
    metadata:
      annotations:
        {{- include "wsproxy.podAnnotations" .Subcharts.wsproxy | nindent 8 }}
    spec:
      terminationGracePeriodSeconds: {{ include "wsproxy.terminationGracePeriodSeconds" .Subcharts.wsproxy }}
      containers:
        - name: app
          lifecycle:
            {{- include "wsproxy.appLifecycle" .Subcharts.wsproxy | nindent 12 }}
        {{- include "wsproxy.sidecar" .Subcharts.wsproxy | nindent 8 }}
      volumes:
        {{- include "wsproxy.sidecarVolumes" .Subcharts.wsproxy | nindent 8 }}
*/}}

{{/* Chart name, truncated to 63 characters. */}}
{{- define "wsproxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified name: <release>-wsproxy, or the release name when it already contains
the chart name. Names the ConfigMap, which the sidecar's volume refers to.
*/}}
{{- define "wsproxy.fullname" -}}
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

{{- define "wsproxy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "wsproxy.labels" -}}
helm.sh/chart: {{ include "wsproxy.chart" . }}
{{ include "wsproxy.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "wsproxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wsproxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The wsproxy image: repository:tag (tag defaults to appVersion), or @digest. */}}
{{- define "wsproxy.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Seconds in a wsproxy duration ("30s", "250ms", "2m", "1h" or a plain number), rounded
up to a whole second. Used to size terminationGracePeriodSeconds from config.shutdown.
*/}}
{{- define "wsproxy.durationSeconds" -}}
{{- $text := toString . | trim }}
{{- $number := regexFind "^([0-9]+[.]?[0-9]*|[.][0-9]+)" $text }}
{{- $unit := trimPrefix $number $text | trim }}
{{- $scales := dict "" 1.0 "s" 1.0 "ms" 0.001 "m" 60.0 "h" 3600.0 }}
{{- if or (not $number) (not (hasKey $scales $unit)) }}
{{- fail (printf "config.shutdown: cannot read %q as a duration (use e.g. 5s, 250ms, 2m)" $text) }}
{{- end }}
{{- mulf (float64 $number) (get $scales $unit) | ceil | int }}
{{- end }}

{{/* Longest time from the preStop hook to wsproxy's exit, in whole seconds. */}}
{{- define "wsproxy.drainSeconds" -}}
{{- $shutdown := .Values.config.shutdown | default dict }}
{{- $drain := include "wsproxy.durationSeconds" (dig "drain_delay" "5s" $shutdown) | int }}
{{- $grace := include "wsproxy.durationSeconds" (dig "grace_period" "20s" $shutdown) | int }}
{{- add (int .Values.preStopSleepSeconds) $drain $grace }}
{{- end }}

{{/*
Pod terminationGracePeriodSeconds: the value set, which must exceed the drain, or the
drain plus terminationGraceExtraSeconds.
*/}}
{{- define "wsproxy.terminationGracePeriodSeconds" -}}
{{- $drain := include "wsproxy.drainSeconds" . | int }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $drain (int .Values.terminationGraceExtraSeconds) }}
{{- else if le (int .Values.terminationGracePeriodSeconds) $drain }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be larger than preStopSleepSeconds + shutdown.drain_delay + shutdown.grace_period (%d s), or wsproxy is killed in the middle of its drain" (int .Values.terminationGracePeriodSeconds) $drain) }}
{{- else }}
{{- int .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/*
A `lifecycle:` body for the application container beside wsproxy: a preStop sleep as
long as wsproxy's whole drain, so the application gets SIGTERM only after wsproxy has
closed its connections (with 1001 to both sides) instead of cutting them under it.
*/}}
{{- define "wsproxy.appLifecycle" -}}
preStop:
  sleep:
    seconds: {{ include "wsproxy.drainSeconds" . }}
{{- end }}

{{/*
The environment variable that carries the broker URL from amqp.urlSecret into the
wsproxy container; the name api-manager reads its own from.
*/}}
{{- define "wsproxy.amqpUrlEnv" -}}RABBITMQ_ADDRESS{{- end }}

{{/*
config.yaml: .Values.config plus listen, admin and tls set by the chart, and
amqp.url_env when amqp.urlSecret names the Secret holding the broker URL.
*/}}
{{- define "wsproxy.config" -}}
{{- $cfg := deepCopy (.Values.config | default dict) }}
{{- $_ := set $cfg "listen" (printf "0.0.0.0:%d" (int .Values.containerPorts.proxy)) }}
{{- $_ = set $cfg "admin" (dict "enabled" true "listen" (printf "0.0.0.0:%d" (int .Values.containerPorts.admin))) }}
{{- if .Values.tls.enabled }}
{{- if not .Values.tls.secretName }}
{{- fail "tls.enabled needs tls.secretName (a Secret of type kubernetes.io/tls)" }}
{{- end }}
{{- $_ = set $cfg "tls" (dict "cert_file" "/etc/wsproxy/tls/tls.crt" "key_file" "/etc/wsproxy/tls/tls.key") }}
{{- end }}
{{- $urlSecret := dig "urlSecret" (dict) (.Values.amqp | default dict) }}
{{- $amqp := $cfg.amqp | default dict }}
{{- if $urlSecret.name }}
{{- if not $urlSecret.key }}
{{- fail "amqp.urlSecret.key is required with amqp.urlSecret.name: the key of the Secret that holds the broker URL" }}
{{- end }}
{{- if or $amqp.url_env $amqp.url_file }}
{{- fail (printf "amqp.urlSecret sets config.amqp.url_env to %s: remove config.amqp.url_env and config.amqp.url_file" (include "wsproxy.amqpUrlEnv" .)) }}
{{- end }}
{{- $_ = set $amqp "url_env" (include "wsproxy.amqpUrlEnv" .) }}
{{- $_ = set $cfg "amqp" $amqp }}
{{- end }}
{{- $eventsRoute := false }}
{{- range $cfg.routes }}
{{- if eq (lower (toString (.mode | default "relay"))) "events" }}
{{- $eventsRoute = true }}
{{- end }}
{{- end }}
{{- $source := lower (toString (dig "source" "zmq" ($cfg.events | default dict))) }}
{{- if and $eventsRoute (eq $source "amqp") (not (or $amqp.url_env $amqp.url_file)) }}
{{- fail "config.events.source is amqp: give the broker URL with amqp.urlSecret (an existing Secret and its key), or set config.amqp.url_env (with extraEnv) or config.amqp.url_file (with extraVolumes)" }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{- define "wsproxy.configChecksum" -}}
{{- include "wsproxy.config" . | sha256sum }}
{{- end }}

{{/* The ConfigMap holding config.yaml. */}}
{{- define "wsproxy.configMap" -}}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ include "wsproxy.fullname" . }}
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "wsproxy.labels" . | nindent 4 }}
data:
  config.yaml: |
    # Rendered by the wsproxy chart from its `config` values; reference:
    # docs/configuration.md. Check a rendering with `wsproxy check --config FILE`.
    {{- include "wsproxy.config" . | nindent 4 }}
{{- end }}

{{/*
Pod annotations: the config checksum (pods restart when config.yaml changes) and, with
metrics.podAnnotations, the prometheus.io scrape annotations for the admin port.
*/}}
{{- define "wsproxy.podAnnotations" -}}
checksum/wsproxy-config: {{ include "wsproxy.configChecksum" . }}
{{- with include "wsproxy.scrapeAnnotations" . }}
{{ . }}
{{- end }}
{{- end }}

{{/* prometheus.io/* annotations for the admin port, with metrics.podAnnotations. */}}
{{- define "wsproxy.scrapeAnnotations" -}}
{{- if .Values.metrics.podAnnotations -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.containerPorts.admin | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}

{{/*
The wsproxy container, as one item of a pod's `containers:` list. Needs the volumes of
wsproxy.sidecarVolumes in the same pod.
*/}}
{{- define "wsproxy.sidecar" -}}
- name: {{ .Values.containerName }}
  image: {{ include "wsproxy.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args: ["run", "--config", "/etc/wsproxy/config.yaml"]
  ports:
    - name: wsproxy
      containerPort: {{ .Values.containerPorts.proxy }}
      protocol: TCP
    - name: wsproxy-admin
      containerPort: {{ .Values.containerPorts.admin }}
      protocol: TCP
  {{- $urlSecret := dig "urlSecret" (dict) (.Values.amqp | default dict) }}
  {{- if or .Values.extraEnv $urlSecret.name }}
  env:
    {{- if $urlSecret.name }}
    # The RabbitMQ events source's broker URL (config.amqp.url_env), from amqp.urlSecret.
    - name: {{ include "wsproxy.amqpUrlEnv" . }}
      valueFrom:
        secretKeyRef:
          name: {{ $urlSecret.name }}
          key: {{ required "amqp.urlSecret.key is required with amqp.urlSecret.name" $urlSecret.key }}
    {{- end }}
    {{- with .Values.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
  {{- with .Values.livenessProbe }}
  livenessProbe:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.readinessProbe }}
  readinessProbe:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if gt (int .Values.preStopSleepSeconds) 0 }}
  lifecycle:
    preStop:
      sleep:
        seconds: {{ int .Values.preStopSleepSeconds }}
  {{- end }}
  {{- with .Values.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: wsproxy-config
      mountPath: /etc/wsproxy
      readOnly: true
    - name: wsproxy-tmp
      mountPath: /tmp
    {{- with .Values.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/*
The sidecar's volumes, as items of a pod's `volumes:` list: config.yaml from the
ConfigMap and, with tls.enabled, tls/tls.crt and tls/tls.key from the Secret, projected
into one directory (/etc/wsproxy); an emptyDir for /tmp (read-only root filesystem).
*/}}
{{- define "wsproxy.sidecarVolumes" -}}
- name: wsproxy-config
  projected:
    sources:
      - configMap:
          name: {{ include "wsproxy.fullname" . }}
          items:
            - key: config.yaml
              path: config.yaml
      {{- if .Values.tls.enabled }}
      - secret:
          name: {{ required "tls.enabled needs tls.secretName" .Values.tls.secretName }}
          items:
            - key: tls.crt
              path: tls/tls.crt
            - key: tls.key
              path: tls/tls.key
      {{- end }}
- name: wsproxy-tmp
  emptyDir:
    sizeLimit: 16Mi
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}
