{{/* The chart's name, or nameOverride. */}}
{{- define "mongoveil.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the release's objects: fullnameOverride, else the release
name when it already contains the chart's name, else "<release>-<chart>".
Kubernetes names are at most 63 characters.
*/}}
{{- define "mongoveil.fullname" -}}
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
The labels of the proxy's Pods, which the Deployment, Service,
PodDisruptionBudget and ServiceMonitor select. The keys-init Job's Pods have
another component, so the Service never sends clients to them.
*/}}
{{- define "mongoveil.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mongoveil.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: proxy
{{- end }}

{{/* The labels of every object, without app.kubernetes.io/component. */}}
{{- define "mongoveil.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "mongoveil.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "mongoveil.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mongoveil.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mongoveil.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "mongoveil.policyConfigMapName" -}}
{{- default (printf "%s-policy" (include "mongoveil.fullname" .)) .Values.existingPolicyConfigMap }}
{{- end }}

{{- define "mongoveil.masterKeySecretName" -}}
{{- default (printf "%s-master-key" (include "mongoveil.fullname" .)) .Values.masterKey.existingSecret }}
{{- end }}

{{- define "mongoveil.upstreamSecretName" -}}
{{- default (printf "%s-upstream" (include "mongoveil.fullname" .)) .Values.upstream.existingSecret }}
{{- end }}

{{/* The upstream URI from its Secret, as the environment variable the proxy reads. */}}
{{- define "mongoveil.upstreamEnv" -}}
- name: MONGOVEIL_UPSTREAM
  valueFrom:
    secretKeyRef:
      name: {{ include "mongoveil.upstreamSecretName" . }}
      key: {{ .Values.upstream.existingSecretKey }}
{{- end }}

{{/*
The folder /etc/mongoveil: serve.yaml, policy.yaml and keys/master.key in one
read-only projected volume. The key's mode 0440 (288) lets root and the group
fsGroup read it.
*/}}
{{- define "mongoveil.configVolume" -}}
- name: mongoveil-config
  projected:
    sources:
      - configMap:
          name: {{ include "mongoveil.fullname" . }}-serve
          items:
            - {key: serve.yaml, path: serve.yaml}
      - configMap:
          name: {{ include "mongoveil.policyConfigMapName" . }}
          items:
            - {key: policy.yaml, path: policy.yaml}
      - secret:
          name: {{ include "mongoveil.masterKeySecretName" . }}
          items:
            - {key: master.key, path: keys/master.key, mode: 288}
{{- end }}

{{/*
The mongoveil container, in standalone mode under `containers` and in sidecar
mode under `initContainers` with restartPolicy Always.
*/}}
{{- define "mongoveil.proxyContainer" -}}
- name: mongoveil
  {{- if eq .Values.mode "sidecar" }}
  restartPolicy: Always
  {{- end }}
  image: {{ include "mongoveil.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  env:
    {{- include "mongoveil.upstreamEnv" . | nindent 4 }}
    {{- if eq .Values.mode "sidecar" }}
    - name: MONGOVEIL_LISTEN
      value: 127.0.0.1:27117
    {{- end }}
    {{- if .Values.advertise }}
    - name: MONGOVEIL_ADVERTISE
      value: {{ .Values.advertise | quote }}
    {{- else if eq .Values.mode "standalone" }}
    - name: POD_NAMESPACE
      valueFrom:
        fieldRef: {fieldPath: metadata.namespace}
    - name: MONGOVEIL_ADVERTISE
      value: {{ printf "%s.$(POD_NAMESPACE).svc:%v" (include "mongoveil.fullname" .) .Values.service.port | quote }}
    {{- end }}
    {{- with .Values.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    {{- if eq .Values.mode "standalone" }}
    - {name: mongodb, containerPort: 27117, protocol: TCP}
    {{- end }}
    - {name: metrics, containerPort: 9216, protocol: TCP}
  startupProbe:
    httpGet: {path: /healthz, port: metrics}
    {{- toYaml .Values.probes.startup | nindent 4 }}
  livenessProbe:
    httpGet: {path: /healthz, port: metrics}
    {{- toYaml .Values.probes.liveness | nindent 4 }}
  readinessProbe:
    httpGet: {path: /readyz, port: metrics}
    {{- toYaml .Values.probes.readiness | nindent 4 }}
  {{- if eq .Values.mode "standalone" }}
  lifecycle:
    preStop:
      exec:
        command: ["sleep", "{{ .Values.preStopSleepSeconds }}"]
  {{- end }}
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - {name: mongoveil-config, mountPath: /etc/mongoveil, readOnly: true}
    - {name: mongoveil-data, mountPath: /var/lib/mongoveil}
    - {name: mongoveil-tmp, mountPath: /tmp}
    {{- with .Values.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/* Render-time checks of values that would otherwise fail only in the cluster. */}}
{{- define "mongoveil.validateValues" -}}
{{- if not (has .Values.mode (list "standalone" "sidecar")) }}
{{- fail (printf "mode: expected standalone or sidecar, got %q" .Values.mode) }}
{{- end }}
{{- $drain := 30 }}
{{- if hasKey .Values.serve "drain-timeout" }}
{{- $drain = index .Values.serve "drain-timeout" }}
{{- end }}
{{- $needed := add $drain .Values.preStopSleepSeconds }}
{{- if le (int .Values.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed serve.drain-timeout plus preStopSleepSeconds (%v), or the kubelet kills requests still draining" .Values.terminationGracePeriodSeconds $needed) }}
{{- end }}
{{- end }}
