#include <stdint.h>
#include <stddef.h>
#include <stdio.h>
#include <sanlock.h>
#define P(T,f) printf("  %-28s off %4zu size %4zu\n", #T "." #f, offsetof(struct T,f), sizeof(((struct T*)0)->f))
int main(void){
 printf("sanlk_disk %zu align %zu\n", sizeof(struct sanlk_disk), _Alignof(struct sanlk_disk));
 P(sanlk_disk,path);P(sanlk_disk,offset);P(sanlk_disk,pad1);P(sanlk_disk,pad2);
 printf("sanlk_resource %zu (+ num_disks*1040)\n", sizeof(struct sanlk_resource));
 P(sanlk_resource,lockspace_name);P(sanlk_resource,name);P(sanlk_resource,lver);P(sanlk_resource,data64);P(sanlk_resource,data32);P(sanlk_resource,unused);P(sanlk_resource,flags);P(sanlk_resource,num_disks);P(sanlk_resource,disks);
 printf("sanlk_lockspace %zu\n", sizeof(struct sanlk_lockspace));
 P(sanlk_lockspace,name);P(sanlk_lockspace,host_id);P(sanlk_lockspace,flags);P(sanlk_lockspace,host_id_disk);
 printf("sanlk_host %zu, sanlk_options %zu\n", sizeof(struct sanlk_host), sizeof(struct sanlk_options));
}
