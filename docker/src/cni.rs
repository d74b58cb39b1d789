//! The CNI plugins driven as the CNI spec (1.0) says: a network
//! configuration list's plugins run in order for ADD (each given the one
//! before's result as `prevResult`) and in reverse for DEL (each given the
//! result ADD ended with), with the parameters in `CNI_*` variables and
//! the plugin's configuration on stdin. `runtimeConfig` carries only the
//! capabilities a plugin declares (`portMappings` for portmap).
//!
//! husk writes no iptables rule of its own: the plugins (Debian's
//! `containernetworking-plugins`) make and remove everything.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

/// Where the plugins are looked for, in order.
pub const PLUGIN_DIRS: [&str; 3] = ["/usr/lib/cni", "/opt/cni/bin", "/usr/libexec/cni"];

/// What a plugin run was for.
pub struct Invocation<'a> {
    /// The container's ID (`CNI_CONTAINERID`).
    pub container_id: &'a str,
    /// The network namespace's path (`CNI_NETNS`).
    pub netns: &'a Path,
    /// The interface in it (`CNI_IFNAME`).
    pub ifname: &'a str,
    /// Capability arguments (`runtimeConfig`), by capability name.
    pub runtime_config: &'a Value,
}

/// A CNI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// No plugin of that type in [`PLUGIN_DIRS`].
    #[error(
        "the CNI plugin {0:?} is not installed (looked in /usr/lib/cni, /opt/cni/bin, /usr/libexec/cni: install containernetworking-plugins)"
    )]
    NoPlugin(String),
    /// The plugin could not be run.
    #[error("run the CNI plugin {plugin}")]
    Spawn {
        /// Its type.
        plugin: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The plugin said no (its error's code and message, CNI's format).
    #[error("CNI {command} of the {plugin} plugin failed: {message}")]
    Plugin {
        /// ADD, DEL, CHECK.
        command: &'static str,
        /// Its type.
        plugin: String,
        /// `msg` (and `details`) of its error, or what it printed.
        message: String,
    },
    /// The configuration list is not one.
    #[error("the CNI configuration list has no plugins")]
    NoPlugins,
}

/// The path of plugin `kind`.
fn plugin_path(kind: &str) -> Result<PathBuf, CniError> {
    if kind.is_empty() || kind.contains('/') || kind.starts_with('.') {
        return Err(CniError::NoPlugin(kind.to_owned()));
    }
    PLUGIN_DIRS
        .iter()
        .map(|d| Path::new(d).join(kind))
        .find(|p| p.is_file())
        .ok_or_else(|| CniError::NoPlugin(kind.to_owned()))
}

/// The configuration one plugin of `list` is given.
fn plugin_config(
    list: &Value,
    plugin: &Value,
    runtime_config: &Value,
    prev: Option<&Value>,
) -> Value {
    let mut conf = plugin.clone();
    conf["name"] = list["name"].clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    if let Some(prev) = prev {
        conf["prevResult"] = prev.clone();
    }
    let mut rc = serde_json::Map::new();
    if let Some(caps) = plugin["capabilities"].as_object() {
        for (cap, on) in caps {
            if on.as_bool() == Some(true) && !runtime_config[cap].is_null() {
                rc.insert(cap.clone(), runtime_config[cap].clone());
            }
        }
    }
    if !rc.is_empty() {
        conf["runtimeConfig"] = Value::Object(rc);
    }
    conf
}

/// Runs one plugin; its stdout's JSON (null when it printed nothing).
fn exec(command: &'static str, conf: &Value, inv: &Invocation<'_>) -> Result<Value, CniError> {
    let kind = conf["type"].as_str().unwrap_or_default().to_owned();
    let path = plugin_path(&kind)?;
    let spawn = |source| CniError::Spawn {
        plugin: kind.clone(),
        source,
    };
    let mut child = Command::new(&path)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", inv.container_id)
        .env("CNI_NETNS", inv.netns)
        .env("CNI_IFNAME", inv.ifname)
        .env("CNI_PATH", PLUGIN_DIRS.join(":"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn)?;
    let input = serde_json::to_vec(conf).expect("JSON");
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(&input).map_err(spawn)?;
    }
    let out = child.wait_with_output().map_err(spawn)?;
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    if !out.status.success() {
        let message = match printed["msg"].as_str() {
            Some(msg) => match printed["details"].as_str().filter(|d| !d.is_empty()) {
                Some(details) => format!("{msg}: {details}"),
                None => msg.to_owned(),
            },
            None => {
                let text = String::from_utf8_lossy(&out.stderr).trim().to_owned();
                if text.is_empty() {
                    format!("exited with {}", out.status)
                } else {
                    text
                }
            }
        };
        return Err(CniError::Plugin {
            command,
            plugin: kind,
            message,
        });
    }
    Ok(printed)
}

fn plugins(list: &Value) -> Result<&Vec<Value>, CniError> {
    list["plugins"]
        .as_array()
        .filter(|p| !p.is_empty())
        .ok_or(CniError::NoPlugins)
}

/// ADD: every plugin in order; the last one's result. A failure part way
/// undoes what was added (DEL of the whole list, as the spec asks).
pub fn add(list: &Value, inv: &Invocation<'_>) -> Result<Value, CniError> {
    let mut prev: Option<Value> = None;
    for plugin in plugins(list)? {
        let conf = plugin_config(list, plugin, inv.runtime_config, prev.as_ref());
        match exec("ADD", &conf, inv) {
            Ok(result) => prev = Some(result),
            Err(e) => {
                let _ = del(list, inv, prev.as_ref());
                return Err(e);
            }
        }
    }
    Ok(prev.unwrap_or(Value::Null))
}

/// DEL: every plugin in reverse order, each given `result` (ADD's, when
/// there was one). Goes on past a failure and returns the first.
pub fn del(list: &Value, inv: &Invocation<'_>, result: Option<&Value>) -> Result<(), CniError> {
    let mut first = None;
    for plugin in plugins(list)?.iter().rev() {
        let conf = plugin_config(list, plugin, inv.runtime_config, result);
        if let Err(e) = exec("DEL", &conf, inv) {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// CHECK: every plugin in order, each given ADD's result.
pub fn check(list: &Value, inv: &Invocation<'_>, result: &Value) -> Result<(), CniError> {
    for plugin in plugins(list)? {
        let conf = plugin_config(list, plugin, inv.runtime_config, Some(result));
        exec("CHECK", &conf, inv)?;
    }
    Ok(())
}

/// The first IPv4 address (without its prefix length) in a CNI result.
pub fn ipv4(result: &Value) -> Option<std::net::Ipv4Addr> {
    result["ips"].as_array()?.iter().find_map(|ip| {
        let addr = ip["address"].as_str()?;
        addr.split('/').next()?.parse().ok()
    })
}

/// A runtimeConfig of port mappings (portmap's capability).
pub fn port_mappings(ports: &[crate::network::Port]) -> Value {
    json!({
        "portMappings": ports.iter().map(|p| json!({
            "hostPort": p.host_port,
            "containerPort": p.container_port,
            "protocol": p.protocol,
            "hostIP": p.host_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        })).collect::<Vec<_>>()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plugin_gets_the_lists_name_its_prev_result_and_only_its_capabilities() {
        let list = json!({"cniVersion": "1.0.0", "name": "n", "plugins": [
            {"type": "bridge"},
            {"type": "portmap", "capabilities": {"portMappings": true}},
        ]});
        let rc = json!({"portMappings": [{"hostPort": 1}], "other": 2});
        let prev = json!({"ips": []});
        let bridge = plugin_config(&list, &list["plugins"][0], &rc, None);
        assert_eq!(
            bridge,
            json!({"type": "bridge", "name": "n", "cniVersion": "1.0.0"})
        );
        let portmap = plugin_config(&list, &list["plugins"][1], &rc, Some(&prev));
        assert_eq!(portmap["prevResult"], prev);
        assert_eq!(
            portmap["runtimeConfig"],
            json!({"portMappings": [{"hostPort": 1}]})
        );
    }

    #[test]
    fn a_plugin_type_that_is_a_path_is_refused() {
        for bad in ["../../bin/sh", "/bin/sh", "", ".hidden"] {
            assert!(
                matches!(plugin_path(bad), Err(CniError::NoPlugin(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_address_is_read_from_a_result() {
        let r = json!({"ips": [{"address": "10.1.2.3/24", "gateway": "10.1.2.1"}]});
        assert_eq!(ipv4(&r), Some("10.1.2.3".parse().unwrap()));
        assert_eq!(ipv4(&json!({})), None);
    }
}
