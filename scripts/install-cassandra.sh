#!/usr/bin/env bash
# Installs Apache Cassandra, the CQL database the tests start in place of
# ScyllaDB (no ScyllaDB package exists for this machine; both speak the same
# CQL protocol). Maven fetches org.apache.cassandra:cassandra-all and every
# runtime dependency from Maven Central into DIR/lib; chappe-testkit
# (crates/testkit/src/cql.rs) runs it with Java 17 from there.
#
# usage: scripts/install-cassandra.sh [DIR]
#
# DIR defaults to ${XDG_CACHE_HOME:-$HOME/.cache}/chappe/cassandra-<version>.
# Nothing is done when DIR already holds a complete install (DIR/.complete);
# the script prints DIR on its standard output, and nothing else there.
# Needs java (17) and mvn on PATH.
set -euo pipefail

# The newest 5.0 release Maven Central serves (checked with
# `mvn dependency:get -Dartifact=org.apache.cassandra:cassandra-all:5.0.10`:
# not found; 5.0.9 is there). chappe-testkit looks for the same directory
# name: change both together (CASSANDRA_VERSION in crates/testkit/src/cql.rs).
CASSANDRA_VERSION=5.0.9
# The plugin that copies the dependencies, pinned so the install does not
# depend on Maven's built-in default.
DEPENDENCY_PLUGIN_VERSION=3.8.1

die() {
    echo "install-cassandra: $*" >&2
    exit 1
}

dir="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/chappe/cassandra-$CASSANDRA_VERSION}"
stamp="$dir/.complete"
expected_stamp="cassandra-all $CASSANDRA_VERSION"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$expected_stamp" ] \
    && [ -f "$dir/lib/cassandra-all-$CASSANDRA_VERSION.jar" ]; then
    echo "$dir"
    exit 0
fi

command -v java >/dev/null 2>&1 || die "java not found: install Java 17 (apt-get install openjdk-17-jdk-headless)"
command -v mvn >/dev/null 2>&1 || die "mvn not found: install Maven (apt-get install maven)"
java_version="$(java -version 2>&1 | head -n 1)"
case "$java_version" in
    *'"17'* | *'"21'*) ;;
    *) echo "install-cassandra: warning: Cassandra $CASSANDRA_VERSION runs on Java 11 or 17; found: $java_version" >&2 ;;
esac

mkdir -p "$dir" || die "cannot create $dir"
# A half-done install: start again from an empty lib/.
rm -f "$stamp"
rm -rf "$dir/lib" "$dir/lib.partial"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cat >"$work/pom.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by scripts/install-cassandra.sh to fetch Cassandra; thrown away. -->
<project xmlns="http://maven.apache.org/POM/4.0.0"
         xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
         xsi:schemaLocation="http://maven.apache.org/POM/4.0.0 http://maven.apache.org/xsd/maven-4.0.0.xsd">
  <modelVersion>4.0.0</modelVersion>
  <groupId>chappe</groupId>
  <artifactId>cassandra-install</artifactId>
  <version>0</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.cassandra</groupId>
      <artifactId>cassandra-all</artifactId>
      <version>$CASSANDRA_VERSION</version>
    </dependency>
  </dependencies>
  <build>
    <plugins>
      <plugin>
        <groupId>org.apache.maven.plugins</groupId>
        <artifactId>maven-dependency-plugin</artifactId>
        <version>$DEPENDENCY_PLUGIN_VERSION</version>
      </plugin>
    </plugins>
  </build>
</project>
EOF

echo "install-cassandra: fetching cassandra-all $CASSANDRA_VERSION and its runtime dependencies from Maven Central into $dir/lib" >&2
if ! mvn -B -q -f "$work/pom.xml" \
    "org.apache.maven.plugins:maven-dependency-plugin:$DEPENDENCY_PLUGIN_VERSION:copy-dependencies" \
    -DincludeScope=runtime \
    -DoutputDirectory="$dir/lib.partial" >"$work/mvn.log" 2>&1; then
    tail -n 30 "$work/mvn.log" >&2
    die "Maven could not fetch cassandra-all $CASSANDRA_VERSION (log above)"
fi
[ -f "$dir/lib.partial/cassandra-all-$CASSANDRA_VERSION.jar" ] \
    || die "Maven finished but $dir/lib.partial has no cassandra-all-$CASSANDRA_VERSION.jar"
mv "$dir/lib.partial" "$dir/lib"
echo "$expected_stamp" >"$stamp"
echo "install-cassandra: installed $(find "$dir/lib" -name '*.jar' | wc -l) jars" >&2
echo "$dir"
