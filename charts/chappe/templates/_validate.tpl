{{/*
Checks that values.schema.json cannot express: the CRD's CEL rules
(x-kubernetes-validations), so that `helm install` refuses what the
apiserver would, with the same messages, before anything is applied.
*/}}
{{- define "chappe.validate" -}}
{{- $p := .Values.platform }}
{{- if $p.enabled }}
{{- if gt (len $p.name) 24 }}
{{- fail (printf "platform.name %q: the name of a ChappePlatform is at most 24 characters (it prefixes the names of the objects it creates)" $p.name) }}
{{- end }}
{{- if and (eq $p.name .Release.Name) (eq (include "chappe.platformNamespace" .) .Release.Namespace) }}
{{- fail (printf "platform.name %q equals the release name in the same namespace: the operator's default-deny NetworkPolicy selects pods by app.kubernetes.io/instance=%s and would cut the operator off; install the operator under another release name (e.g. chappe-operator) or set another platform.name" $p.name $p.name) }}
{{- end }}
{{- $names := dict }}
{{- $serving := 0 }}
{{- range $p.regions }}
{{- if hasKey $names .name }}
{{- fail (printf "platform.regions: region names must be unique (%q appears twice)" .name) }}
{{- end }}
{{- $_ := set $names .name true }}
{{- if not .draining }}{{ $serving = add1 $serving }}{{ end }}
{{- $gw := .gateway | default dict }}
{{- if and (not .draining) (hasKey $gw "replicas") (lt (int $gw.replicas) 1) }}
{{- fail (printf "platform.regions[%s]: gateway replicas must be at least 1 unless the region is draining" .name) }}
{{- end }}
{{- $region := . }}
{{- range $svc := list "gateway" "fanout" "keydir" "presence" "media" }}
{{- $s := get $region $svc | default dict }}
{{- with $s.autoscaling }}
{{- if lt (int .maxReplicas) (int .minReplicas) }}
{{- fail (printf "platform.regions[%s].%s: autoscaling.maxReplicas must be at least minReplicas" $region.name $svc) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- if eq $serving 0 }}
{{- fail "platform.regions: every region is draining; at least one must serve clients" }}
{{- end }}
{{- $store := $p.store | default dict }}
{{- if eq (hasKey $store "embedded") (hasKey $store "scylla") }}
{{- fail "platform.store: spec.store needs exactly one of scylla or embedded" }}
{{- end }}
{{- if and (hasKey $store "embedded") (ne (len $p.regions) 1) }}
{{- fail "platform.store.embedded: an embedded store runs in exactly one region" }}
{{- end }}
{{- with $store.scylla }}
{{- $dcNames := dict }}
{{- $dcRegions := dict }}
{{- $nodes := dict }}
{{- range .datacenters }}
{{- if hasKey $dcNames .name }}
{{- fail (printf "platform.store.scylla: ScyllaDB datacenter names must be unique (%q)" .name) }}
{{- end }}
{{- if hasKey $dcRegions .region }}
{{- fail (printf "platform.store.scylla: a region has one ScyllaDB datacenter (%q has several)" .region) }}
{{- end }}
{{- if not (hasKey $names .region) }}
{{- fail (printf "platform.store.scylla: every ScyllaDB datacenter must belong to a region of spec.regions (%q is not one)" .region) }}
{{- end }}
{{- $_ := set $dcNames .name true }}
{{- $_ := set $dcRegions .region true }}
{{- $_ := set $nodes .name (int .nodes) }}
{{- end }}
{{- range $r := $p.regions }}
{{- if not (hasKey $dcRegions $r.name) }}
{{- fail (printf "platform.store.scylla: every region needs a ScyllaDB datacenter in spec.store.scylla.datacenters (%q has none)" $r.name) }}
{{- end }}
{{- end }}
{{- range $dc, $rf := .replication }}
{{- if not (hasKey $nodes $dc) }}
{{- fail (printf "platform.store.scylla.replication: every key of spec.store.scylla.replication must name a datacenter of spec.store.scylla.datacenters (%q does not)" $dc) }}
{{- end }}
{{- if lt (int $rf) 1 }}
{{- fail (printf "platform.store.scylla.replication: a replication factor is at least 1 (%s: %v)" $dc $rf) }}
{{- end }}
{{- if gt (int $rf) (get $nodes $dc) }}
{{- fail (printf "platform.store.scylla.replication: a replication factor must not exceed the number of nodes of its datacenter (%s: %v > %v nodes)" $dc $rf (get $nodes $dc)) }}
{{- end }}
{{- end }}
{{- end }}
{{- $nats := $p.nats | default dict }}
{{- if and (hasKey $nats "managed") (hasKey $nats "external") (not (kindIs "invalid" $nats.managed)) (not (kindIs "invalid" $nats.external)) }}
{{- fail "platform.nats: spec.nats takes managed or external, not both (set the other to null)" }}
{{- end }}
{{- with $nats.external }}
{{- range $r := $p.regions }}
{{- if not (hasKey $.Values.platform.nats.external.urls $r.name) }}
{{- fail (printf "platform.nats.external.urls: spec.nats.external.urls needs the NATS URLs of every region (%q has none)" $r.name) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
