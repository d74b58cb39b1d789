//! Kubernetes' view: pods through containerd's CRI with the `husk`
//! runtime handler (husk's shim: a pod is one microVM), as a kubelet
//! drives them.

use std::time::Duration;

use husk_cri_tests::{Containerd, cri, dial_in_netns, processes_with};

/// The husk VMMs of pod `pod`.
fn vmms_of(pod: &str) -> Vec<u32> {
    processes_with(&["husk-vmm", pod])
}

#[tokio::test(flavor = "current_thread")]
async fn a_pod_of_two_containers_is_one_vm_through_cri() {
    let mut ctd = Containerd::start("pod", (std::process::id() % 200 + 20) as u8).await;
    let config = ctd.pod_config("web");
    let pod = ctd.run_pod(&config, "husk").await;

    // Two containers sharing the pod's localhost and an emptyDir.
    let empty = ctd.dir.join("empty-dir");
    std::fs::create_dir_all(&empty).unwrap();
    let volume = cri::Mount {
        container_path: "/data".into(),
        host_path: empty.display().to_string(),
        ..Default::default()
    };
    let mut web = Containerd::container_config(
        "server",
        &[
            "sh",
            "-c",
            "mkdir -p /www && echo hello-from-the-server > /www/index.html && exec httpd -f -p 8080 -h /www",
        ],
    );
    web.mounts.push(volume.clone());
    let web = ctd.start_container(&pod, &config, web).await;
    let mut client = Containerd::container_config(
        "client",
        &["sh", "-c", "echo client started; exec sleep 1000"],
    );
    client.mounts.push(volume);
    // A read-only host directory, and the termination log: a host file
    // the kubelet binds at /dev/termination-log.
    let config_dir = ctd.dir.join("config-dir");
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::write(config_dir.join("setting"), "on\n").unwrap();
    client.mounts.push(cri::Mount {
        container_path: "/config".into(),
        host_path: config_dir.display().to_string(),
        readonly: true,
        ..Default::default()
    });
    let termination_log = ctd.dir.join("termination-log");
    std::fs::write(&termination_log, "").unwrap();
    client.mounts.push(cri::Mount {
        container_path: "/dev/termination-log".into(),
        host_path: termination_log.display().to_string(),
        ..Default::default()
    });
    let client = ctd.start_container(&pod, &config, client).await;

    // One VM for the pod, none for its containers.
    assert_eq!(vmms_of(&pod).len(), 1, "the pod's VM");
    assert!(vmms_of(&web).is_empty() && vmms_of(&client).is_empty());

    // localhost, the emptyDir, exec's exit codes.
    let (code, out, err) = ctd
        .exec(
            &client,
            &["wget", "-q", "-O", "-", "http://127.0.0.1:8080/"],
        )
        .await;
    assert_eq!(
        (code, out.as_str()),
        (0, "hello-from-the-server\n"),
        "{err}"
    );
    // The read-only directory reads and refuses writes; what the
    // container writes to its termination log is on the host.
    let (code, out, err) = ctd
        .exec(
            &client,
            &[
                "sh",
                "-c",
                "cat /config/setting; echo bye > /dev/termination-log; touch /config/new",
            ],
        )
        .await;
    assert_eq!((code, out.as_str()), (1, "on\n"), "{err}");
    assert!(err.contains("Read-only file system"), "{err}");
    assert!(!config_dir.join("new").exists());
    assert_eq!(std::fs::read_to_string(&termination_log).unwrap(), "bye\n");

    // Port forwarding as containerd does it: a connection to localhost
    // in the pod's namespace on the host reaches the guest's port; a port
    // nobody listens on in the guest ends at once.
    let netns = ctd.pod_netns(&pod).await;
    let answer = dial_in_netns(&netns, 8080, b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.") && answer.ends_with("hello-from-the-server\n"),
        "{answer}"
    );
    assert_eq!(dial_in_netns(&netns, 8081, b"").unwrap(), b"");
    let (code, _, _) = ctd
        .exec(&web, &["sh", "-c", "echo shared > /data/f; exit 3"])
        .await;
    assert_eq!(code, 3);
    let (_, out, _) = ctd.exec(&client, &["cat", "/data/f"]).await;
    assert_eq!(out, "shared\n");
    assert_eq!(
        std::fs::read_to_string(empty.join("f")).unwrap(),
        "shared\n"
    );

    // Logs in CRI's format, written by containerd from the shim's stdio.
    let log = std::path::Path::new(&config.log_directory).join("client.log");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let logged = loop {
        let logged = std::fs::read_to_string(&log).unwrap_or_default();
        if logged.contains("client started") || std::time::Instant::now() > deadline {
            break logged;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(logged.contains(" stdout F client started"), "{logged:?}");

    // Stats from the container's guest cgroup.
    let stats = ctd
        .runtime
        .container_stats(cri::ContainerStatsRequest {
            container_id: client.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    let memory = stats.memory.unwrap();
    assert!(
        memory.working_set_bytes.map_or(0, |v| v.value) > 0,
        "{memory:?}"
    );

    // Update: a memory limit, enforced in the container's guest cgroup.
    ctd.runtime
        .update_container_resources(cri::UpdateContainerResourcesRequest {
            container_id: client.clone(),
            linux: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: 100 << 20,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("UpdateContainerResources: {e}"));
    let (_, out, _) = ctd
        .exec(
            &client,
            &[
                "sh",
                "-c",
                "cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/memory.max",
            ],
        )
        .await;
    assert_eq!(out.trim(), (100u64 << 20).to_string());

    // A container over its memory limit: OOM-killed, as CRI reports it.
    let mut hog = Containerd::container_config(
        "hog",
        &["sh", "-c", "dd if=/dev/zero of=/dev/null bs=96M count=1"],
    );
    hog.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 32 << 20,
            ..Default::default()
        }),
        ..Default::default()
    });
    let hog = ctd.start_container(&pod, &config, hog).await;
    let status = ctd.wait_exited(&hog).await;
    assert_eq!(
        (status.exit_code, status.reason.as_str()),
        (137, "OOMKilled"),
        "{status:?}"
    );

    // A container the pod's VM cannot hold: refused by name.
    let mut huge = Containerd::container_config("huge", &["true"]);
    huge.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 8 << 30,
            ..Default::default()
        }),
        ..Default::default()
    });
    let made = ctd
        .runtime
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(huge),
            sandbox_config: Some(config.clone()),
        })
        .await;
    let e = match made {
        Ok(r) => ctd
            .runtime
            .start_container(cri::StartContainerRequest {
                container_id: r.into_inner().container_id,
            })
            .await
            .expect_err("a container bigger than its pod's VM started"),
        Err(e) => e,
    };
    assert!(e.message().contains("does not fit pod"), "{e}");

    // Stop and remove: nothing of the pod is left.
    for id in [&web, &client] {
        ctd.runtime
            .stop_container(cri::StopContainerRequest {
                container_id: id.clone(),
                timeout: 10,
            })
            .await
            .unwrap_or_else(|e| panic!("StopContainer: {e}"));
    }
    ctd.remove_pod(&pod).await;
    let left = ctd.leftovers(&pod, &[&web, &client, &hog]);
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_killed_pod_vm_is_reported_as_exited_containers() {
    let mut ctd = Containerd::start("kill", (std::process::id() % 200 + 21) as u8).await;
    let config = ctd.pod_config("doomed");
    let pod = ctd.run_pod(&config, "husk").await;
    let c = Containerd::container_config("sleeper", &["sleep", "1000"]);
    let c = ctd.start_container(&pod, &config, c).await;
    let vmm = vmms_of(&pod);
    assert_eq!(vmm.len(), 1);
    husk_test_support::kill(vmm[0], rustix::process::Signal::KILL);
    let status = ctd.wait_exited(&c).await;
    assert_eq!(status.exit_code, 137, "{status:?}");
    ctd.remove_pod(&pod).await;
    let left = ctd.leftovers(&pod, &[&c]);
    assert!(left.is_empty(), "{left:?}");
}
